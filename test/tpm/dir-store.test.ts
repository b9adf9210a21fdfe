// DirStateStore: what store() resolves is what load() returns, from this store object or a new one
// (after a crash); a torn slot falls back to the previous state, a damaged file is refused with a
// clear error, files of the first format still load, and a writer killed at any moment never leaves
// an unreadable state or one older than the last it acknowledged.
import { spawn } from 'node:child_process';
import { copyFileSync, linkSync, mkdirSync, readFileSync, readdirSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { DirStateStore, SPARE_DIR, SlotFileError } from '../../src/tpm/dir-store.js';
import { DEFAULT_SLOT_CAP, RecordType, SLOT_HEADER_SIZE, encodeFile, encodeRecord, parseSlotFile } from '../../src/tpm/slot-file.js';
import { hex } from './helpers.js';
import { scratchDir } from '../helpers/temp.js';

const here = dirname(fileURLToPath(import.meta.url));
/** State files only (not the spare directory, not temp files a killed writer may leave). */
const stateFiles = (d: string): string[] => readdirSync(d).filter((f) => f.startsWith('tpm-') && !f.includes('.tmp-')).sort();

describe('DirStateStore', () => {
  const cleanups: Array<() => void> = [];
  afterAll(() => {
    for (const c of cleanups) c();
  });
  const dir = (): string => {
    const t = scratchDir('dirstore');
    cleanups.push(t.cleanup);
    return t.dir;
  };

  it('stores, overwrites, loads and deletes; files are 0600 and no temp file stays', async () => {
    const store = new DirStateStore(dir());
    expect(await store.load(3, 'permanent')).toBeNull();
    await store.store(3, 'permanent', Uint8Array.of(1, 2, 3));
    await store.store(3, 'volatile', new Uint8Array(0));
    await store.store(3, 'permanent', Uint8Array.of(4, 5));
    expect(hex((await store.load(3, 'permanent'))!)).toBe('0405');
    expect((await store.load(3, 'volatile'))!.length).toBe(0);
    expect(readdirSync(store.dir).filter((f) => f !== SPARE_DIR).sort()).toEqual(['tpm-3.permanent', 'tpm-3.volatile']);
    expect(statSync(store.path(3, 'permanent')).mode & 0o777).toBe(0o600);
    await store.delete(3, 'volatile');
    await store.delete(3, 'savestate'); // missing: not an error
    expect(stateFiles(store.dir)).toEqual(['tpm-3.permanent']);
    store.close();
    await store.store(3, 'savestate', Uint8Array.of(9)); // reopens the directory fd
    expect(hex((await store.load(3, 'savestate'))!)).toBe('09');
    // A new store object (what a restart sees) reads the same.
    const again = new DirStateStore(store.dir);
    expect(hex((await again.load(3, 'permanent'))!)).toBe('0405');
    expect(await again.load(3, 'volatile')).toBeNull();
    store.close();
  });

  it('a new kind takes a ready spare file (no rename); overwrites alternate slots in place, size fixed', async () => {
    const store = await DirStateStore.open(dir(), { spares: 2 });
    expect(store.spareCount).toBe(2);
    const spares = readdirSync(join(store.dir, SPARE_DIR));
    expect(spares).toHaveLength(2);
    const spareInodes = spares.map((s) => statSync(join(store.dir, SPARE_DIR, s)).ino);
    await store.store(7, 'permanent', new Uint8Array(1300).fill(1));
    expect(store.spareCount).toBe(1);
    const file = store.path(7, 'permanent');
    const st = statSync(file);
    expect(spareInodes).toContain(st.ino);
    expect(st.size).toBe(2 * DEFAULT_SLOT_CAP);
    // slot 0 still holds the spare record (seq 1), slot 1 the state (seq 2).
    const b = readFileSync(file);
    expect(b.subarray(0, 8).toString('latin1')).toBe('vTPMslot');
    expect(b[10]).toBe(RecordType.SPARE);
    expect([b[DEFAULT_SLOT_CAP + 10], b.readBigUInt64LE(DEFAULT_SLOT_CAP + 16)]).toEqual([RecordType.BLOB, 2n]);
    await store.store(7, 'permanent', new Uint8Array(1300).fill(2)); // seq 3 -> slot 0
    await store.store(7, 'permanent', new Uint8Array(1300).fill(3)); // seq 4 -> slot 1
    const after = readFileSync(file);
    expect([after.readBigUInt64LE(16), after.readBigUInt64LE(DEFAULT_SLOT_CAP + 16)]).toEqual([3n, 4n]);
    expect(statSync(file)).toMatchObject({ ino: st.ino, size: 2 * DEFAULT_SLOT_CAP });
    expect((await new DirStateStore(store.dir, { spares: 0 }).load(7, 'permanent'))![0]).toBe(3);
    // The refill (a few ms later, off the write's path) makes the pool whole again.
    await store.sparesReady();
    expect(store.spareCount).toBe(2);
    store.close();
  });

  it('close() stops spare refills for good: nothing makes files in the directory after it (a test may be removing it)', async () => {
    const store = await DirStateStore.open(dir(), { spares: 2 });
    store.close();
    // A claim after close still works; the refill it used to schedule would make a file again.
    await store.store(1, 'permanent', Uint8Array.of(1));
    expect(hex((await store.load(1, 'permanent'))!)).toBe('01');
    await sleep(100);
    expect(readdirSync(join(store.dir, SPARE_DIR))).toHaveLength(1);
    expect(store.spareCount).toBe(1);
  });

  it('a first write never clobbers a file another writer made since load() found none (link, EEXIST)', async () => {
    const d = dir();
    const a = await DirStateStore.open(d, { spares: 1 });
    expect(await a.load(4, 'permanent')).toBeNull();
    await new DirStateStore(d, { spares: 0 }).store(4, 'permanent', Uint8Array.of(0xb));
    await expect(a.store(4, 'permanent', Uint8Array.of(0xa))).rejects.toMatchObject({ code: 'EEXIST' });
    expect(hex((await new DirStateStore(d, { spares: 0 }).load(4, 'permanent'))!)).toBe('0b');
    // The spare it had written into is gone from the pool and from .spare/ (it named instance 4).
    expect(a.spareCount).toBe(0);
    await a.sparesReady();
    expect(readdirSync(join(d, SPARE_DIR))).toHaveLength(1);
    a.close();
  });

  it('a blob that outgrows its slots moves to a bigger file; spares: 0 still writes new kinds', async () => {
    const store = new DirStateStore(dir(), { spares: 0 });
    await store.store(1, 'volatile', new Uint8Array(100).fill(1));
    expect(readdirSync(store.dir)).toEqual(['tpm-1.volatile']);
    await store.store(1, 'volatile', new Uint8Array(40000).fill(2));
    const size = statSync(store.path(1, 'volatile')).size;
    expect(size).toBeGreaterThanOrEqual(2 * (SLOT_HEADER_SIZE + 40000));
    expect(size % 8192).toBe(0);
    await store.store(1, 'volatile', new Uint8Array(39000).fill(3));
    expect(statSync(store.path(1, 'volatile')).size).toBe(size);
    const got = (await new DirStateStore(store.dir, { spares: 0 }).load(1, 'volatile'))!;
    expect([got.length, new Set(got).size, got[0]]).toEqual([39000, 1, 3]);
    store.close();
  });

  it('a torn newest slot gives the previous state; a file with no valid slot is refused clearly', async () => {
    const store = new DirStateStore(dir(), { spares: 0 });
    for (const v of [1, 2, 3]) await store.store(2, 'permanent', new Uint8Array(3000).fill(v));
    const file = store.path(2, 'permanent');
    const good = readFileSync(file);
    const cap = good.length / 2;
    // v1 in slot 0 (seq 1), v2 in slot 1 (seq 2), v3 in slot 0 (seq 3). Tear v3: its last page never
    // reached the disk (the old bytes of that slot are still there).
    const torn = Buffer.from(good);
    torn.fill(0, 2048, 4096);
    writeFileSync(file, torn);
    expect((await new DirStateStore(store.dir, { spares: 0 }).load(2, 'permanent'))![0]).toBe(2);
    // Only its header reached the disk: the same.
    const headerOnly = Buffer.from(good);
    headerOnly.fill(0xee, SLOT_HEADER_SIZE, cap);
    writeFileSync(file, headerOnly);
    expect((await new DirStateStore(store.dir, { spares: 0 }).load(2, 'permanent'))![0]).toBe(2);
    // The writer picks the slot after the newest VALID record: the torn slot 0 is rewritten, slot 1 kept.
    const w = new DirStateStore(store.dir, { spares: 0 });
    expect((await w.load(2, 'permanent'))![0]).toBe(2);
    await w.store(2, 'permanent', new Uint8Array(3000).fill(4));
    expect(readFileSync(file).subarray(cap, 2 * cap).equals(good.subarray(cap, 2 * cap))).toBe(true);
    expect((await new DirStateStore(store.dir, { spares: 0 }).load(2, 'permanent'))![0]).toBe(4);
    // Both slots damaged: refused, naming the file and what failed in each slot.
    const bad = readFileSync(file);
    bad[SLOT_HEADER_SIZE + 10] ^= 0xff;
    bad[cap + SLOT_HEADER_SIZE + 10] ^= 0xff;
    writeFileSync(file, bad);
    const err = await new DirStateStore(store.dir, { spares: 0 }).load(2, 'permanent').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SlotFileError);
    expect(err).toMatchObject({ code: 'CORRUPT' });
    expect((err as Error).message).toMatch(/tpm-2\.permanent: no slot holds a valid record \(slot 0: checksum mismatch .*; slot 1: checksum mismatch/);
    // ... and so is a store over it (the TPM must not go on from a state nobody can read).
    await expect(new DirStateStore(store.dir, { spares: 0 }).store(2, 'permanent', Uint8Array.of(1))).rejects.toMatchObject({ code: 'CORRUPT' });
    store.close();
  });

  it("another instance's file under a name is refused (IDENTITY), not served", async () => {
    const store = new DirStateStore(dir(), { spares: 0 });
    await store.store(1, 'permanent', Uint8Array.of(1));
    copyFileSync(store.path(1, 'permanent'), store.path(2, 'permanent'));
    await expect(store.load(2, 'permanent')).rejects.toThrow(/tpm-2\.permanent: holds the permanent state of instance 1, not permanent of 2/);
    store.close();
  });

  it('files of the first format (the raw blob) load, and the next store converts them', async () => {
    const d = dir();
    const raw = new Uint8Array(1299).map((_, i) => i & 0xff);
    writeFileSync(join(d, 'tpm-5.permanent'), raw, { mode: 0o600 });
    writeFileSync(join(d, 'tpm-5.volatile'), new Uint8Array(0));
    const store = new DirStateStore(d);
    expect(hex((await store.load(5, 'permanent'))!)).toBe(hex(raw));
    expect((await store.load(5, 'volatile'))!.length).toBe(0);
    await store.store(5, 'permanent', Uint8Array.of(7, 7));
    expect(parseSlotFile(readFileSync(store.path(5, 'permanent')), 'f').format).toBe('slots');
    expect(hex((await new DirStateStore(d).load(5, 'permanent'))!)).toBe('0707');
    store.close();
  });

  it('path is a directory: store rejects, keeps nothing half-written, removes its temp file', async () => {
    const store = new DirStateStore(dir());
    // A non-empty directory where the blob should go.
    mkdirSync(join(store.path(4, 'permanent'), 'x'), { recursive: true });
    await expect(store.store(4, 'permanent', Uint8Array.of(1))).rejects.toMatchObject({ code: expect.stringMatching(/EISDIR|ENOTEMPTY|EEXIST/) });
    expect(readdirSync(store.dir).filter((f) => f !== SPARE_DIR)).toEqual(['tpm-4.permanent']);
    expect(await store.load(5, 'permanent')).toBeNull();
    store.close();
  });

  it('recovery: a claimed spare whose link a crash lost is put under its name; dead spares go', async () => {
    const d = dir();
    const store = await DirStateStore.open(d, { spares: 2 });
    await store.store(9, 'savestate', Uint8Array.of(9, 9));
    store.close();
    // What a power loss before the directory reached the disk can leave: the claimed file still under
    // its spare name (owner: a dead process of this boot), plus an unclaimed spare of that process.
    const owner = readdirSync(join(d, SPARE_DIR))[0]!.split('-')[0]!;
    const dead = `${owner}-99999999-deadbeef`;
    renameSync(store.path(9, 'savestate'), join(d, SPARE_DIR, `${dead}-1`));
    writeFileSync(join(d, SPARE_DIR, `${dead}-2`), encodeFile(DEFAULT_SLOT_CAP, { type: RecordType.SPARE, kind: null, instance: 0, seq: 1n, payload: new Uint8Array(0) }));
    writeFileSync(join(d, SPARE_DIR, `${dead}-3`), new Uint8Array(100)); // a spare half-made
    // Killed between link and unlink: two names, one file.
    await store.store(10, 'permanent', Uint8Array.of(10));
    linkSync(store.path(10, 'permanent'), join(d, SPARE_DIR, `${dead}-4`));
    expect(stateFiles(d)).toEqual(['tpm-10.permanent']);
    const after = new DirStateStore(d, { spares: 0 });
    expect(hex((await after.load(9, 'savestate'))!)).toBe('0909');
    expect(stateFiles(d)).toEqual(['tpm-10.permanent', 'tpm-9.savestate']);
    expect(hex((await after.load(10, 'permanent'))!)).toBe('0a');
    // Left: only the live store's own spare (the first store object is closed, but this process lives).
    expect(readdirSync(join(d, SPARE_DIR)).filter((f) => f.startsWith(dead))).toEqual([]);
  });

  it('parseSlotFile: damage inside one slot never yields anything but one of the two records', () => {
    const cap = 8192;
    const file = new Uint8Array(2 * cap);
    const a = new Uint8Array(700).fill(0xa1);
    const b = new Uint8Array(900).fill(0xb2);
    file.set(encodeRecord(cap, { type: RecordType.BLOB, kind: 'permanent', instance: 3, seq: 5n, payload: a }), 0);
    file.set(encodeRecord(cap, { type: RecordType.BLOB, kind: 'permanent', instance: 3, seq: 6n, payload: b }), cap);
    fc.assert(
      fc.property(fc.nat(1), fc.array(fc.tuple(fc.nat(cap - 1), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 8 }), (slot, flips) => {
        const f = file.slice();
        for (const [off, x] of flips) f[slot * cap + off]! ^= x;
        const p = parseSlotFile(f, 'f');
        expect(p.format).toBe('slots');
        if (p.format !== 'slots') return;
        const got = hex(p.content.record.payload);
        expect([hex(a), hex(b)]).toContain(got);
        // Damage to the newest slot's record can only roll back to the other slot, never further.
        if (slot === 0) expect(got).toBe(hex(b));
      }),
    );
    // Random bytes are the first format (no magic), or refused; never a record.
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 3 * 4096 }), (bytes) => {
        const p = parseSlotFile(bytes, 'f');
        expect(p.format).toBe('legacy');
      }),
    );
  });

  it('a writer killed at any moment leaves every acknowledged state readable and never older', async () => {
    const d = dir();
    for (let round = 0; round < 6; round++) {
      const base = 1000 * (round + 1);
      const child = spawn(process.execPath, [join(here, 'dir-store-child.mjs'), d, String(base)], { stdio: ['ignore', 'pipe', 'inherit'] });
      const acked = new Map<number, number>();
      const lines = createInterface({ input: child.stdout });
      const closed = new Promise((r) => lines.once('close', r));
      const ready = new Promise<void>((resolve, reject) => {
        lines.on('line', (l) => {
          if (l === 'ready') return;
          const [n, i] = l.split(' ').map(Number) as [number, number];
          acked.set(n, i);
          resolve(); // from the first acknowledged write on
        });
        child.once('exit', (c) => reject(new Error(`writer exited with ${c}`)));
      });
      await ready;
      // Let it go on writing for a while (a different moment each round), then kill it mid-stream.
      await new Promise((r) => setTimeout(r, 5 + round * 9));
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;
      await closed;
      // What a restart sees: a new store object on the directory.
      const store = new DirStateStore(d, { spares: 0 });
      const last = acked.get(1) ?? 0;
      const blob = await store.load(1, 'permanent');
      if (last > 0 || blob) {
        expect(blob!.length).toBe(65536);
        expect(new Set(blob).size).toBe(1);
        // The last acknowledged write, or the one in flight when the kill came.
        expect([last % 251, (last + 1) % 251]).toContain(blob![0]);
      }
      for (const [n, i] of acked) {
        if (n === 1) continue;
        const got = (await store.load(n, 'permanent'))!;
        expect({ n, length: got.length, byte: got[0] }).toEqual({ n, length: 1200, byte: i % 251 });
      }
      expect(acked.size).toBeGreaterThan(0);
    }
  });
});
