// The adaptive poll window (halt-polling for rings) and the bounded spin.
import { describe, expect, it } from 'vitest';
import { PollWindow, spinUntil, cpuContended, pressureShare } from '../../src/xen/index.js';

describe('PollWindow', () => {
  it('starts open, stays open after short waits, shuts after a long one and probes every 16th wait', () => {
    const w = new PollWindow(50, () => false);
    expect(w.budgetUs).toBe(50);
    w.record(12);
    expect(w.budgetUs).toBe(50);
    w.record(150); // a wait that slept costs its two wake-ups: still counts as short (≤ 4 windows)
    expect(w.budgetUs).toBe(50);
    w.record(5000); // a key generation: polling would have burnt CPU for nothing
    const budgets = Array.from({ length: 32 }, () => w.budgetUs);
    expect(budgets.filter((b) => b === 50)).toHaveLength(2);
    expect(budgets[15]).toBe(50);
    expect(budgets[31]).toBe(50);
    w.record(20); // the probe found the peer fast again
    expect(w.budgetUs).toBe(50);
  });

  it('stands down while the CPUs are contended and polls again when they are not', () => {
    let busy = true;
    const w = new PollWindow(50, () => busy);
    expect(w.budgetUs).toBe(0);
    busy = false;
    expect(w.budgetUs).toBe(50);
  });

  it('reads CPU pressure without failing on this machine', () => {
    expect(typeof cpuContended()).toBe('boolean');
  });

  it('takes CPU pressure over the last interval from the stall counter, not the lagging 10 s average', () => {
    const psi = (avg10: number, total: number): string =>
      `some avg10=${avg10.toFixed(2)} avg60=30.00 avg300=20.00 total=${total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n`;
    // A burst just ended: avg10 still says 40 %, but only 5 ms of stall in the last 250 ms (2 %).
    expect(pressureShare(psi(40, 1_005_000), 1_000_000, 250)).toEqual({ share: 2, stallUs: 1_005_000 });
    // Contended now: 100 ms of stall in 250 ms.
    expect(pressureShare(psi(1, 1_100_000), 1_000_000, 250)!.share).toBe(40);
    // First sample, or one from long ago: the kernel's average is all there is.
    expect(pressureShare(psi(12.5, 7), -1, 250)).toEqual({ share: 12.5, stallUs: 7 });
    expect(pressureShare(psi(12.5, 7), 3, 60_000)).toEqual({ share: 12.5, stallUs: 7 });
    expect(pressureShare('garbage', 0, 250)).toBeNull();
  });

  it('never polls with a window of 0', () => {
    const w = new PollWindow(0, () => false);
    w.record(1);
    expect(Array.from({ length: 40 }, () => w.budgetUs).every((b) => b === 0)).toBe(true);
  });

  it('rejects a nonsense VTPM_POLL_US', () => {
    const old = process.env.VTPM_POLL_US;
    process.env.VTPM_POLL_US = 'fast';
    try {
      expect(() => new PollWindow()).toThrow(/VTPM_POLL_US=fast/);
    } finally {
      if (old === undefined) delete process.env.VTPM_POLL_US;
      else process.env.VTPM_POLL_US = old;
    }
  });
});

describe('spinUntil', () => {
  it('returns as soon as the condition holds', () => {
    let n = 0;
    expect(spinUntil(() => ++n >= 100, 1_000_000)).toBe(true);
    expect(n).toBe(100);
  });

  it('gives up when the budget is spent', () => {
    let n = 0;
    expect(spinUntil(() => (n++, false), 200)).toBe(false);
    expect(n).toBeGreaterThan(1);
  });

  it('gives up at once when other work waits', () => {
    let n = 0;
    expect(spinUntil(() => (n++, false), 10_000_000, () => true)).toBe(false);
    expect(n).toBeLessThan(100);
  });

  it('does not spin at all with no budget', () => {
    let n = 0;
    expect(spinUntil(() => (n++, false), 0)).toBe(false);
    expect(n).toBe(1);
  });
});
