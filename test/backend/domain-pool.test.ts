import { describe, expect, it } from 'vitest';
import { CrashWindow, DomidPool, FIRST_VTPM_DOMID } from '../../src/backend/domain-pool.js';
import { DOMID_MAX } from '../../src/xenstore/permissions.js';

describe('DomidPool', () => {
  it('concurrent takes get distinct domids even while the in-use check awaits', async () => {
    const pool = new DomidPool(FIRST_VTPM_DOMID, () => new Promise((r) => setTimeout(() => r(false), 5)));
    const got = await Promise.all(Array.from({ length: 8 }, () => pool.take()));
    expect(new Set(got).size).toBe(8);
    expect(got.every((d) => d !== null && d >= FIRST_VTPM_DOMID)).toBe(true);
  });

  it('skips domids in use elsewhere, hands them out round robin, and says null when none is left', async () => {
    const first = DOMID_MAX - 2;
    const pool = new DomidPool(first, async (d) => d === first + 1);
    expect(await pool.take()).toBe(first);
    expect(await pool.take()).toBe(first + 2);
    expect(await pool.take()).toBeNull();
    pool.release(first);
    expect(await pool.take()).toBe(first);
  });

  it('keeps a domid a running domain already names, unless out of range or taken', async () => {
    const pool = new DomidPool(FIRST_VTPM_DOMID, async () => false);
    expect(pool.keep(FIRST_VTPM_DOMID + 7)).toBe(true);
    expect(pool.keep(FIRST_VTPM_DOMID + 7)).toBe(false);
    expect(pool.keep(FIRST_VTPM_DOMID - 1)).toBe(false);
    expect(pool.keep(DOMID_MAX + 1)).toBe(false);
    expect(pool.keep(-1)).toBe(false);
    expect(pool.has(FIRST_VTPM_DOMID + 7)).toBe(true);
  });
});

describe('CrashWindow', () => {
  it('gives up on the crash past the limit within the window; old crashes slide out', () => {
    const w = new CrashWindow(2, 1000);
    expect(w.record(0)).toBe(false);
    expect(w.record(100)).toBe(false);
    expect(w.record(200)).toBe(true);
    expect(w.count).toBe(3);
    expect(w.record(1150)).toBe(false);
    expect(w.count).toBe(2);
  });
});
