// The exactly-once table rides inside the volatile-state blob (src/backend/journal.ts): its parser must
// take back exactly what it wrote, and refuse (JournalError) rather than misread a damaged blob.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { dist } from '../helpers/child.js';
import type { StateKind, StateStore } from '../../src/tpm/state-store.js';

const { JournalStore, JournalError, JOURNAL_WINDOW } = (await import(dist('src/backend/journal.js'))) as typeof import('../../src/backend/journal.js');

/** A store that only holds blobs (the manager's role here is just to keep bytes). */
class Blobs implements StateStore {
  readonly m = new Map<string, Uint8Array>();
  async load(i: number, k: StateKind) {
    return this.m.get(`${i}/${k}`) ?? null;
  }
  async store(i: number, k: StateKind, b: Uint8Array) {
    this.m.set(`${i}/${k}`, b.slice());
  }
  async delete(i: number, k: StateKind) {
    this.m.delete(`${i}/${k}`);
  }
}

describe('exactly-once table in the volatile blob', () => {
  it('shows its layout: magic "VTJ2", count, {id, status, length, bytes}, volatile length, the libtpms blob', async () => {
    const inner = new Blobs();
    const j = new JournalStore(inner, 3);
    j.record(0x0102n, { status: 3, response: Uint8Array.of(0x80, 0x01) });
    await j.store(3, 'volatile', Uint8Array.of(0xaa, 0xbb));
    expect(Buffer.from(inner.m.get('3/volatile')!).toString('hex')).toBe(
      '56544a32' + '01000000' + '0201000000000000' + '03000000' + '02000000' + '8001' + '02000000' + 'aabb',
    );
  });

  it('loads replay records after the libtpms blob, and a "VTJ1" blob of before', async () => {
    const inner = new Blobs();
    // VTJ2, no entries, 2 volatile bytes, one record: id 7, locality 3, status 0, command 0x11 0x22, response 0x33.
    inner.m.set('3/volatile', Buffer.from('56544a32' + '00000000' + '02000000' + 'aabb' + '0700000000000000' + '03' + '00000000' + '02000000' + '1122' + '01000000' + '33', 'hex'));
    const j = new JournalStore(inner, 3);
    expect(Buffer.from((await j.load(3, 'volatile'))!).toString('hex')).toBe('aabb');
    expect(j.takeReplay()).toEqual([{ id: 7n, locality: 3, status: 0, command: Uint8Array.of(0x11, 0x22), response: Uint8Array.of(0x33) }]);
    expect(j.highestCompleted).toBe(7n);
    expect(j.loadedVolatile).toBe(true);
    inner.m.set('3/volatile', Buffer.from('56544a31' + '01000000' + '0201000000000000' + '03000000' + '02000000' + '8001' + 'aabb', 'hex'));
    expect(Buffer.from((await j.load(3, 'volatile'))!).toString('hex')).toBe('aabb');
    expect(j.get(0x0102n)).toEqual({ status: 3, response: Uint8Array.of(0x80, 0x01) });
    expect(j.takeReplay()).toEqual([]);
  });

  it('round-trips any table and volatile blob', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ id: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), status: fc.nat(3), response: fc.uint8Array({ maxLength: 200 }) }), { maxLength: JOURNAL_WINDOW }),
        fc.uint8Array({ maxLength: 500 }),
        async (entries, vol) => {
          const inner = new Blobs();
          const a = new JournalStore(inner, 1);
          for (const e of entries) a.record(e.id, { status: e.status, response: e.response });
          await a.store(1, 'volatile', vol);
          const b = new JournalStore(inner, 1);
          const back = await b.load(1, 'volatile');
          expect(back === null ? new Uint8Array(0) : back).toEqual(vol);
          const last = new Map(entries.map((e) => [e.id, e]));
          for (const [id, e] of last) expect(b.get(id)).toEqual({ status: e.status, response: e.response });
        },
      ),
      { numRuns: 200 },
    );
  });

  it('refuses damaged tables with JournalError and never throws anything else', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 300 }), async (tail) => {
        const inner = new Blobs();
        inner.m.set('1/volatile', Uint8Array.from([0x56, 0x54, 0x4a, 0x31, ...tail]));
        try {
          await new JournalStore(inner, 1).load(1, 'volatile');
        } catch (err) {
          expect(err).toBeInstanceOf(JournalError);
        }
      }),
      { numRuns: 500 },
    );
  });
});
