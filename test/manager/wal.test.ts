import { afterEach, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { ManagerClient } from '../../src/manager/client.js';
import { blobName } from '../../src/manager/store-meta.js';
import { DirOps } from '../../src/manager/store-ops.js';
import { GroupCommitStore } from '../../src/manager/store.js';
import { WAL_FILE, encodeRecord, readRecord, replay, type WalRecord } from '../../src/manager/wal.js';
import { restartable } from './helpers.js';
import { removeDir, tempDir as newTempDir } from '../helpers/temp.js';

// Every directory a test here makes is removed after it.
const made: string[] = [];
const tempDir = (tag: string): string => {
  const d = newTempDir(tag);
  made.push(d);
  return d;
};
afterEach(() => {
  for (const d of made.splice(0)) removeDir(d);
});

const macKey = crypto.randomBytes(32);

async function open(dir: string, logBytes?: number): Promise<GroupCommitStore> {
  return (await GroupCommitStore.open(new DirOps(dir), macKey, () => [], { logBytes })).store;
}

/** [offset in the file, length] of each record in one half of a log, by their length fields (no MAC check). */
function halfRecords(log: Buffer, half: 0 | 1): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const end = (half + 1) * (log.length / 2);
  for (let o = half * (log.length / 2); o + 8 <= end && log.readUInt32BE(o) === 0x5657414c; ) {
    const len = 8 + log.readUInt32BE(o + 4) + 32;
    out.push([o, len]);
    o += len;
  }
  return out;
}

/** The records of both halves (a store that never filled a half uses one of them). */
function records(log: Buffer): Array<[number, number]> {
  return [...halfRecords(log, 0), ...halfRecords(log, 1)];
}

const walOf = (d: string): string => path.join(d, WAL_FILE);
const text = async (s: GroupCommitStore, i: number): Promise<string | null> => (await s.load(i, 'permanent'))?.data.toString() ?? null;

/**
 * Three saves, each its own record: instance 1 "a1", instance 1 "a2", instance 2 "b1". The store is
 * then abandoned without close() (no checkpoint): what a crash leaves.
 */
async function threeRecords(): Promise<{ d: string; log: Buffer; recs: Array<[number, number]> }> {
  const d = tempDir('wal');
  const s = await open(d);
  await s.save(1, 'permanent', s.reserve(), Buffer.from('a1'));
  await s.save(1, 'permanent', s.reserve(), Buffer.from('a2'));
  await s.save(2, 'permanent', s.reserve(), Buffer.from('b1'));
  expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob'))).toEqual([]);
  const log = fs.readFileSync(walOf(d));
  const recs = records(log);
  expect(recs).toHaveLength(3);
  return { d, log, recs };
}

describe('write-ahead log: record format', () => {
  it('encodes a record as magic | length | body | HMAC, big-endian (bytes shown)', () => {
    const key = Buffer.alloc(32, 0x11);
    const r: WalRecord = { gen: 7, seq: 1, clock: 0x1234, saves: [{ instance: 3, kind: 'volatile', generation: 0x1234, data: Buffer.from('SEAL') }], removes: [{ instance: 4, kind: 'savestate' }] };
    const b = encodeRecord(r, key);
    const body = Buffer.from(
      '0000000000000007' + // log generation
        '0000000000000001' + // seq
        '0000000000001234' + // clock
        '00000001' + '00000001' + 'ffffffff' + // one save, one remove, table unchanged
        '00000003' + '01' + '0000000000001234' + '00000004' + '5345414c' + // instance 3, volatile, generation, 4 bytes "SEAL"
        '00000004' + '02', // remove instance 4 savestate
      'hex',
    );
    const head = Buffer.from('5657414c' + body.length.toString(16).padStart(8, '0'), 'hex');
    expect(b.subarray(0, 8 + body.length).toString('hex')).toBe(Buffer.concat([head, body]).toString('hex'));
    expect(b.subarray(8 + body.length)).toEqual(crypto.createHmac('sha256', key).update(Buffer.concat([head, body])).digest());
    const back = readRecord(b, 0, key, 7, 1);
    expect(back).toEqual({ record: { ...r, table: undefined }, next: b.length });
    expect(readRecord(b, 0, key, 8, 1)).toEqual({ stop: expect.stringMatching(/generation 7, not 8/) });
    expect(readRecord(b, 0, key, 7, 2)).toEqual({ stop: expect.stringMatching(/number 1, expected 2/) });
    expect(readRecord(b, 0, crypto.randomBytes(32), 7, 1)).toEqual({ stop: expect.stringMatching(/MAC/) });
  });

  it('fuzz: any bytes after valid records stop replay without throwing, and never add records', () => {
    const key = crypto.randomBytes(32);
    const good = Buffer.concat(
      [1, 2].map((seq) => encodeRecord({ gen: 3, seq, clock: seq, saves: [{ instance: seq, kind: 'permanent', generation: seq, data: Buffer.alloc(40, seq) }], removes: [], table: seq === 2 ? [{ x: 1 }] : undefined }, key)),
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(good.length), (junk, cut) => {
        // Junk after both records, or in place of the tail from `cut` on (a torn second record).
        const whole = replay(Buffer.concat([good, junk]), key, 3);
        expect(whole.records.map((r) => r.seq)).toEqual([1, 2]);
        const torn = replay(Buffer.concat([good.subarray(0, cut), junk]), key, 3);
        expect(torn.records.length).toBeLessThanOrEqual(2);
        for (const r of torn.records) expect(r.saves[0]!.data).toEqual(Buffer.alloc(40, r.seq));
      }),
      { numRuns: 500 },
    );
  });
});

describe('write-ahead log: replay in the store', () => {
  it('a crash with saves only in the log: reopening replays them, then checkpoints them as files', async () => {
    const { d } = await threeRecords();
    const s = await open(d);
    expect(s.stats.replayed).toBe(3);
    expect(s.replayStop).toMatch(/^generation \d+: zeros/);
    expect(await text(s, 1)).toBe('a2');
    expect(await text(s, 2)).toBe('b1');
    expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob')).sort()).toEqual([blobName(1, 'permanent', s.generation(1, 'permanent')!), blobName(2, 'permanent', s.generation(2, 'permanent')!)].sort());
  });

  it('a torn tail (the file cut in the middle of the last record) is ignored; what came before is intact', async () => {
    const { d, recs } = await threeRecords();
    const [off, len] = recs[2]!;
    fs.truncateSync(walOf(d), off + Math.floor(len / 2));
    const s = await open(d);
    expect(s.stats.replayed).toBe(2);
    expect(s.replayStop).toMatch(/torn/);
    expect(await text(s, 1)).toBe('a2');
    expect(await text(s, 2)).toBeNull();
    // The log is full-size and zeroed again, and the next saves and restarts work.
    expect(fs.statSync(walOf(d)).size).toBe(16 * 1024 * 1024);
    await s.save(2, 'permanent', s.reserve(), Buffer.from('b2'));
    const again = await open(d);
    expect(await text(again, 2)).toBe('b2');
  });

  it('a torn last record (its second half never reached the disk) and a garbage tail are ignored', async () => {
    const { d, log, recs } = await threeRecords();
    const [off, len] = recs[2]!;
    const torn = Buffer.from(log);
    torn.fill(0, off + Math.floor(len / 2), off + len);
    fs.writeFileSync(walOf(d), torn);
    let s = await open(d);
    expect(s.stats.replayed).toBe(2);
    expect(await text(s, 1)).toBe('a2');
    expect(await text(s, 2)).toBeNull();

    const { d: d2, log: log2, recs: recs2 } = await threeRecords();
    const end = recs2[2]![0] + recs2[2]![1];
    const junk = Buffer.from(log2);
    crypto.randomBytes(5000).copy(junk, end);
    // Garbage that starts like a record header, with a length that fits.
    const fake = Buffer.from(log2);
    fake.writeUInt32BE(0x5657414c, end);
    fake.writeUInt32BE(200, end + 4);
    crypto.randomBytes(232).copy(fake, end + 8);
    for (const bytes of [junk, fake]) {
      fs.writeFileSync(walOf(d2), bytes);
      const dir = tempDir('wal-copy');
      for (const f of fs.readdirSync(d2)) fs.copyFileSync(path.join(d2, f), path.join(dir, f));
      s = await open(dir);
      expect(s.stats.replayed).toBe(3);
      expect(await text(s, 1)).toBe('a2');
      expect(await text(s, 2)).toBe('b1');
    }
  });

  it('a record whose MAC fails stops replay there: later valid records are not applied', async () => {
    const { d, log, recs } = await threeRecords();
    const bad = Buffer.from(log);
    const [off, len] = recs[1]!; // "a2"
    bad[off + len - 40]! ^= 0x01; // a byte of its blob
    fs.writeFileSync(walOf(d), bad);
    const s = await open(d);
    expect(s.stats.replayed).toBe(1);
    expect(s.replayStop).toMatch(/fails its MAC/);
    expect(await text(s, 1)).toBe('a1');
    // Record 3 ("b1") verifies, but it follows the bad one.
    expect(await text(s, 2)).toBeNull();
  });

  it('a record of an earlier log generation is never replayed, even when it sits exactly where the next one would', async () => {
    const d = tempDir('wal');
    const s = await open(d);
    // Generation G: "bbbbb" for instance 2, then "a-old" for instance 1; same record sizes throughout.
    await s.save(2, 'permanent', s.reserve(), Buffer.from('bbbbb'));
    await s.save(1, 'permanent', s.reserve(), Buffer.from('a-old'));
    const half = records(fs.readFileSync(walOf(d)))[0]![0] === 0 ? 0 : 1;
    // Two checkpoints: G+1 (other half, no records), then G+2, back in G's half.
    await s.checkpoint();
    await s.checkpoint();
    // Record 1 of G+2 ("a-new" for instance 1) overwrites record 1 of G, same size, so G's record 2
    // ("a-old") follows it at the very offset where record 2 of G+2 would be.
    await s.save(1, 'permanent', s.reserve(), Buffer.from('a-new'));
    const recs = halfRecords(fs.readFileSync(walOf(d)), half);
    expect(recs).toHaveLength(2);
    expect(recs[0]![1]).toBe(recs[1]![1]);
    const r = await open(d);
    expect(r.stats.replayed).toBe(1);
    expect(r.replayStop).toMatch(/^generation \d+: record at offset \d+ belongs to log generation \d+, not \d+/);
    expect(await text(r, 1)).toBe('a-new');
    expect(await text(r, 2)).toBe('bbbbb');
  });

  it('a full half moves appends to the other half and checkpoints in the background; a crash before that checkpoint is durable replays both generations', async () => {
    const d = tempDir('wal');
    const s = await open(d, 64 * 1024); // halves of 32 KiB: six records of a 5 KiB blob each
    const metaBefore = fs.readFileSync(path.join(d, 'meta'));
    const val = (i: number): Buffer => Buffer.alloc(5000, i);
    for (let i = 1; i <= 9; i++) await s.save(i, 'permanent', s.reserve(), val(i));
    await s.flush(); // the background checkpoint
    expect(s.stats.checkpoints).toBe(1);
    const log = fs.readFileSync(walOf(d));
    expect([halfRecords(log, 0).length, halfRecords(log, 1).length].sort()).toEqual([3, 6]);
    // Blobs 1..6 are files now; 7..9 only in the log.
    expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob'))).toHaveLength(6);
    for (let i = 1; i <= 9; i++) expect((await s.load(i, 'permanent'))!.data.equals(val(i))).toBe(true);

    // A crash now: the checkpoint, then the three records after it.
    const now = tempDir('wal-copy');
    for (const f of fs.readdirSync(d)) fs.copyFileSync(path.join(d, f), path.join(now, f));
    const a = await open(now, 64 * 1024);
    expect(a.stats.replayed).toBe(3);
    for (let i = 1; i <= 9; i++) expect((await a.load(i, 'permanent'))!.data.equals(val(i)), `blob ${i}`).toBe(true);

    // A crash before the checkpoint's metadata rename: the old metadata, both generations replayed.
    fs.writeFileSync(path.join(d, 'meta'), metaBefore);
    const b = await open(d, 64 * 1024);
    expect(b.stats.replayed).toBe(9);
    expect(b.replayStop).toMatch(/^generation \d+: .*; generation \d+: zeros/);
    for (let i = 1; i <= 9; i++) expect((await b.load(i, 'permanent'))!.data.equals(val(i)), `blob ${i}`).toBe(true);
  });

  it('log resets at checkpoints under concurrent saves lose nothing', async () => {
    const d = tempDir('wal');
    const s = await open(d, 128 * 1024);
    const last = new Map<number, string>();
    let n = 0;
    // 10 concurrent writers, 100 saves of ~2 KiB each over 40 instances: batches of up to 10, about
    // 3 log records between checkpoints, so records, checkpoints and log resets interleave.
    await Promise.all(
      Array.from({ length: 10 }, async (_, w) => {
        for (let j = 0; j < 100; j++) {
          const inst = 1 + ((w * 4 + j) % 40);
          const v = `${inst}:${++n}:${'x'.repeat(2000 + (n % 97))}`;
          last.set(inst, v);
          await s.save(inst, 'permanent', s.reserve(), Buffer.from(v));
        }
      }),
    );
    expect(s.stats.checkpoints).toBeGreaterThan(10);
    expect(s.stats.commits).toBeGreaterThan(2 * s.stats.checkpoints);
    for (const [inst, v] of last) expect(await text(s, inst)).toBe(v);
    // Abandoned without close (a crash): the last checkpoint plus the log since give the same state.
    // A crashed manager's background checkpoint is dead too; this one lives in our process, so let it
    // end first (two stores writing one directory's meta.tmp is what the manager's pid file prevents).
    await s.flush();
    const r = await open(d, 128 * 1024);
    for (const [inst, v] of last) expect(await text(r, inst), `instance ${inst}`).toBe(v);
  });

  it('appends on the threadpool (append: async) write the same records: replayed after a crash', async () => {
    const d = tempDir('wal');
    const s = (await GroupCommitStore.open(new DirOps(d), macKey, () => [], { append: 'async', logBytes: 64 * 1024 })).store;
    const val = (i: number, n: number): Buffer => Buffer.alloc(3000, i * 16 + n);
    for (let n = 0; n < 4; n++) await Promise.all(Array.from({ length: 8 }, (_, i) => s.save(i + 1, 'volatile', s.reserve(), val(i + 1, n))));
    await s.flush();
    expect(s.stats.checkpoints).toBeGreaterThan(0);
    const r = await open(d, 64 * 1024);
    expect(r.stats.replayed).toBeGreaterThan(0);
    for (let i = 1; i <= 8; i++) expect((await r.load(i, 'volatile'))!.data.equals(val(i, 3)), `blob ${i}`).toBe(true);
  });

  it('reopening twice in a row is idempotent', async () => {
    const { d } = await threeRecords();
    const a = await open(d);
    const filesA = fs.readdirSync(d).sort();
    const b = await open(d);
    expect(b.stats.replayed).toBe(0); // the first reopen checkpointed the replayed records
    expect(fs.readdirSync(d).sort()).toEqual(filesA);
    for (const s of [a, b]) {
      expect(await text(s, 1)).toBe('a2');
      expect(await text(s, 2)).toBe('b1');
    }
    expect(b.generation(1, 'permanent')).toBe(a.generation(1, 'permanent'));
  });
});

describe('write-ahead log: kill -9 of the real manager', () => {
  const { start, now, clients } = restartable();
  const uuid = (i: number): string => `e0000000-0000-4000-8000-${i.toString(16).padStart(12, '0')}`;

  it('saves acknowledged only through the log survive kill -9, and a second restart changes nothing', async () => {
    const stateDir = tempDir('walk-state');
    const runDir = tempDir('walk-run');
    let c = await start(stateDir, runDir);
    const want = new Map<string, Buffer>();
    const inst: number[] = [];
    for (let v = 1; v <= 4; v++) inst.push((await c.open({ vmUuid: uuid(v), version: '2.0' })).instance);
    for (let round = 0; round < 5; round++)
      for (const i of inst)
        for (const kind of ['permanent', 'volatile'] as const) {
          const b = crypto.randomBytes(9 * 1024);
          await c.store(i, kind, b);
          want.set(`${i}.${kind}`, b);
        }
    // Acknowledged, and only in the log: no blob file exists yet.
    expect(fs.readdirSync(stateDir).filter((f) => f.endsWith('.blob'))).toEqual([]);
    await now().stop('SIGKILL');

    c = await start(stateDir, runDir);
    await now().waitLog(/replayed \d+ log records/);
    const check = async (): Promise<void> => {
      for (const [k, b] of want) {
        const [i, kind] = k.split('.') as [string, 'permanent' | 'volatile'];
        expect(Buffer.from((await c.load(Number(i), kind))!).equals(b), k).toBe(true);
      }
    };
    await check();
    const files = fs.readdirSync(stateDir).filter((f) => f.endsWith('.blob')).sort();
    expect(files).toHaveLength(8);

    // Killed again right away: the restart before checkpointed the replay, so nothing is replayed now.
    await now().stop('SIGKILL');
    clients.splice(0).forEach((x) => x.disconnect());
    c = await start(stateDir, runDir);
    expect(now().log.some((l) => /replayed/.test(l))).toBe(false);
    await check();
    expect(fs.readdirSync(stateDir).filter((f) => f.endsWith('.blob')).sort()).toEqual(files);
    for (let v = 1; v <= 4; v++) expect(await c.open({ vmUuid: uuid(v), version: '2.0' })).toEqual({ instance: inst[v - 1], created: false });
  });

  it('kill -9 during concurrent saves with a small log (checkpoints every few commits) keeps every acknowledged save', async () => {
    const stateDir = tempDir('walc-state');
    const runDir = tempDir('walc-run');
    const extra = ['--log-bytes', String(256 * 1024)];
    let c = await start(stateDir, runDir, extra);
    const more = await Promise.all(Array.from({ length: 7 }, () => ManagerClient.connect(runDir)));
    clients.push(...more);
    const all = [c, ...more];
    const inst: number[] = [];
    for (let v = 1; v <= 16; v++) inst.push((await c.open({ vmUuid: uuid(100 + v), version: '2.0' })).instance);
    const acked = new Map<number, Buffer>();
    const issued = new Map<number, Buffer[]>();
    let ok = 0;
    const killAt = 150 + Math.floor(Math.random() * 150);
    // Each instance's saves go one after another through its own client; instances run concurrently,
    // at uneven paces, so a batch holds some instances and not others. A quarter of them save only 5
    // times at the start: their blobs must come through every later checkpoint and log reset.
    await Promise.all(
      inst.map(async (i, k) => {
        for (let n = 0; n < (k % 4 === 0 ? 5 : 40); n++) {
          if (Math.random() < 0.3) await new Promise((r) => setTimeout(r, Math.random() * 4));
          const b = crypto.randomBytes(3000);
          issued.set(i, [...(issued.get(i) ?? []), b]);
          try {
            await all[k % all.length]!.store(i, 'permanent', b);
          } catch {
            return; // cut off by the kill
          }
          acked.set(i, b);
          if (++ok === killAt) now().proc.kill('SIGKILL');
        }
      }),
    );
    expect(ok).toBeGreaterThanOrEqual(killAt); 
    await now().stop();
    for (const x of clients.splice(0)) x.disconnect();
    c = await start(stateDir, runDir, extra);
    for (const i of inst) {
      const got = await c.load(i, 'permanent');
      const a = acked.get(i);
      if (!a) continue;
      const g = Buffer.from(got!);
      // The last acknowledged save, or one issued after it (durable but cut off before its ack).
      const seq = issued.get(i)!;
      const at = seq.findIndex((b) => b.equals(g));
      expect(at, `instance ${i} holds a blob that was never saved`).toBeGreaterThanOrEqual(0);
      expect(at, `instance ${i} went back`).toBeGreaterThanOrEqual(seq.indexOf(a));
    }
  });
});
