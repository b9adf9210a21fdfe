// The adaptive poll window (halt-polling for rings) and the bounded spin.
import { describe, expect, it } from 'vitest';
import { PollWindow, spinUntil, cpuContended } from '../../src/xen/index.js';

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

  it('learns the peer\'s pace from answered() to arrived(): a slow follow-up shuts the window, a message without an answer before it counts for nothing', () => {
    const w = new PollWindow(50, () => false);
    w.arrived(1000); // nothing answered yet
    expect(w.budgetUs).toBe(50);
    w.answered(1000);
    expect(w.awaiting).toBe(true);
    w.arrived(1000.1); // 100 µs later: within 4 windows
    expect(w.awaiting).toBe(false);
    expect(w.budgetUs).toBe(50);
    w.answered(2000);
    w.arrived(2001); // 1 ms later: too slow to be worth a spin
    expect(w.budgetUs).toBe(0);
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
    expect(n).toBeLessThanOrEqual(18); // at its first look for other work: 16 looks in, and one before and after
  });

  it('looks for other work once per 16 looks at the ring (each look a few ports: otherPendingSome)', () => {
    let looks = 0;
    let others = 0;
    expect(spinUntil(() => ++looks >= 5000, 10_000_000, () => (others++, false))).toBe(true);
    expect(others).toBeGreaterThan(Math.floor(looks / 16) - 2);
    expect(others).toBeLessThanOrEqual(Math.ceil(looks / 16));
  });

  it('does not spin at all with no budget', () => {
    let n = 0;
    expect(spinUntil(() => (n++, false), 0)).toBe(false);
    expect(n).toBe(1);
  });
  it('stands aside before its first look when the peer waits for its CPU, and at the next check when it starts to', () => {
    let looks = 0;
    let asked = 0;
    expect(spinUntil(() => (looks++, false), 10_000_000, undefined, { sharesCpu: () => (asked++, true) })).toBe(false);
    expect(asked).toBe(1);
    expect(looks).toBe(2); // the look before the spin, and the one after standing aside
    // Elsewhere for the first 100 checks, then on our CPU: the spin ends at that check, not at its budget.
    looks = 0;
    asked = 0;
    expect(spinUntil(() => (looks++, false), 10_000_000, undefined, { sharesCpu: () => ++asked > 100 })).toBe(false);
    expect(asked).toBe(101);
    expect(looks).toBeLessThanOrEqual(100 * 16 + 2);
    // A peer that never shares the CPU changes nothing: the answer is still found.
    looks = 0;
    expect(spinUntil(() => ++looks >= 500, 10_000_000, undefined, { sharesCpu: () => false })).toBe(true);
  });
});
