// The background writer writes only what changed: a held checkpoint the store already holds gets the
// bytes appended since, sealed as a piece of their own and logged as an append entry applied onto the
// generation it names (docs/manager-storage.md, "Appended pieces"). A load returns exactly base +
// appends in order; a piece onto the wrong base, out of order, twice, or copied to another instance is
// never applied or opened; kill -9 at any point keeps every state the writer made durable.
import { afterEach, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { chainBytes, splitChain } from '../../src/manager/chain.js';
import { HOLD_FLUSH_MS } from '../../src/manager/daemon.js';
import { HeldVolatile } from '../../src/manager/held-volatile.js';
import { MAX_PIECES, heldWriter } from '../../src/manager/held-writer.js';
import type { VmRecord } from '../../src/manager/vm-table.js';
import type { VtpmStore } from '../../src/manager/vm-store.js';
import { Sealer, type PieceContext } from '../../src/manager/seal.js';
import { StoreError } from '../../src/manager/store-meta.js';
import { DirOps, type StoreOps } from '../../src/manager/store-ops.js';
import { GroupCommitStore } from '../../src/manager/store.js';
import { WAL_FILE, encodeRecord, readRecord, walKey, type WalRecord } from '../../src/manager/wal.js';
import { refusal, restartable } from './helpers.js';
import { removeDir, tempDir } from '../helpers/temp.js';

const A = '11111111-1111-4111-8111-111111111111';
const B = '22222222-2222-4222-8222-222222222222';
const macKey = crypto.randomBytes(32);
const dirs: string[] = [];
const dir = (tag: string): string => {
  const d = tempDir(tag);
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) removeDir(d);
});

async function open(d: string, logBytes?: number): Promise<GroupCommitStore> {
  return (await GroupCommitStore.open(new DirOps(d), macKey, () => [], { logBytes })).store;
}

/** [offset, bytes, magic] of each record in the log file (by length fields, both halves). */
function logRecords(log: Buffer): Array<[number, number, string]> {
  const out: Array<[number, number, string]> = [];
  for (const half of [0, 1]) {
    const end = (half + 1) * (log.length / 2);
    for (let o = half * (log.length / 2); o + 8 <= end && log.subarray(o, o + 3).toString() === 'VWA'; ) {
      const len = 8 + log.readUInt32BE(o + 4) + 32;
      out.push([o, len, log.subarray(o, o + 4).toString()]);
      o += len;
    }
  }
  return out;
}

describe('append entry and sealed pieces: formats', () => {
  it('a record with appends is "VWAP" with an appends count and one entry per piece (bytes shown); one without stays "VWAL"', () => {
    const key = Buffer.alloc(32, 0x22);
    const r: WalRecord = { gen: 7, seq: 2, clock: 0x99, saves: [], removes: [], appends: [{ instance: 3, kind: 'volatile', onto: 0x40, generation: 0x41, data: Buffer.from('PIECE') }] };
    const b = encodeRecord(r, key);
    const body = Buffer.from(
      '0000000000000007' + '0000000000000002' + '0000000000000099' + // log generation, seq, clock
        '00000000' + '00000000' + 'ffffffff' + // no saves, no removes, table unchanged
        '00000001' + // one append
        '00000003' + '01' + '0000000000000040' + '0000000000000041' + '00000005' + '5049454345', // instance 3, volatile, onto 0x40, now 0x41, 5 bytes "PIECE"
      'hex',
    );
    const head = Buffer.from('56574150' + body.length.toString(16).padStart(8, '0'), 'hex');
    expect(b.subarray(0, 8 + body.length).toString('hex')).toBe(Buffer.concat([head, body]).toString('hex'));
    expect(b.subarray(8 + body.length)).toEqual(crypto.createHmac('sha256', key).update(Buffer.concat([head, body])).digest());
    expect(readRecord(b, 0, key, 7, 2)).toEqual({ record: { ...r, table: undefined }, next: b.length });
    expect(encodeRecord({ ...r, appends: [] }, key).subarray(0, 4).toString()).toBe('VWAL');
    // A torn append record (cut anywhere) is never read as a record.
    for (let cut = 1; cut < b.length; cut += 7) expect('stop' in readRecord(Buffer.concat([b.subarray(0, cut), Buffer.alloc(64)]), 0, key, 7, 2)).toBe(true);
  });

  it('a piece is header (its AAD) | salt | tag | ciphertext; a chain opens to base + pieces in order and refuses every splice', () => {
    const s = new Sealer(crypto.randomBytes(32));
    const base = crypto.randomBytes(3000);
    const [p1, p2] = [crypto.randomBytes(100), crypto.randomBytes(250)];
    const env = s.seal({ instance: 5, vmUuid: A, kind: 'volatile', generation: 10 }, base);
    const ctx1: PieceContext = { instance: 5, vmUuid: A, base: 10, previous: 10, offset: 3000, generation: 11 };
    const ctx2: PieceContext = { ...ctx1, previous: 11, offset: 3100, generation: 12 };
    const s1 = s.sealPiece(ctx1, p1);
    const s2 = s.sealPiece(ctx2, p2);
    // magic "VTPMPIEC" | format 1 | instance 5 | uuid | base 10 | previous 10 | offset 3000 | generation 11
    expect(s1.subarray(0, 61).toString('hex')).toBe(
      Buffer.from('VTPMPIEC').toString('hex') + '01' + '00000005' + A.replace(/-/g, '') + '000000000000000a' + '000000000000000a' + '0000000000000bb8' + '000000000000000b',
    );
    expect(s1.length).toBe(61 + 16 + 16 + 100);
    const chain = chainBytes(chainBytes(env, [s1]), [s2]);
    expect(Buffer.from(chain).subarray(0, 12).toString('hex')).toBe(Buffer.from('VTPMCHAN').toString('hex') + env.length.toString(16).padStart(8, '0'));
    expect(splitChain(chain).pieces).toEqual([s1, s2]);
    const want = { instance: 5, vmUuid: A, kind: 'volatile' as const, generation: 12 };
    expect(s.open(want, chain)).toEqual(Buffer.concat([base, p1, p2]));
    // Out of order, twice, cut short (the metadata names generation 12), onto another base.
    expect(refusal(() => s.open(want, chainBytes(env, [s2, s1])))).toBe('ROLLBACK');
    expect(refusal(() => s.open(want, chainBytes(env, [s1, s1, s2])))).toBe('ROLLBACK');
    expect(refusal(() => s.open(want, chainBytes(env, [s1])))).toBe('ROLLBACK');
    expect(s.open({ ...want, generation: 11 }, chainBytes(env, [s1]))).toEqual(Buffer.concat([base, p1]));
    const otherBase = s.seal({ instance: 5, vmUuid: A, kind: 'volatile', generation: 9 }, base);
    expect(refusal(() => s.open(want, chainBytes(otherBase, [s1, s2])))).toBe('ROLLBACK');
    // The same pieces in another instance's (or VM's) chain, and an edited byte.
    const envB = s.seal({ instance: 6, vmUuid: A, kind: 'volatile', generation: 10 }, base);
    expect(refusal(() => s.open({ ...want, instance: 6 }, chainBytes(envB, [s1, s2])))).toBe('WRONG_OWNER');
    const envVm = s.seal({ instance: 5, vmUuid: B, kind: 'volatile', generation: 10 }, base);
    expect(refusal(() => s.open({ ...want, vmUuid: B }, chainBytes(envVm, [s1, s2])))).toBe('WRONG_OWNER');
    const edited = Buffer.from(s2);
    edited[edited.length - 1]! ^= 1;
    expect(refusal(() => s.open(want, chainBytes(env, [s1, edited])))).toBe('TAMPERED');
    // A header edited to claim another offset fails the tag, not only the chain walk.
    const moved = Buffer.from(s1);
    moved.writeBigUInt64BE(3001n, 45);
    expect(refusal(() => s.open({ ...want, generation: 11 }, chainBytes(s.seal({ instance: 5, vmUuid: A, kind: 'volatile', generation: 10 }, Buffer.concat([base, Buffer.from('x')])), [moved])))).toBe('TAMPERED');
  });
});

describe('the store: appends', () => {
  const text = async (s: GroupCommitStore, i: number): Promise<string | null> => {
    const got = await s.load(i, 'volatile');
    if (!got) return null;
    const { base, pieces } = splitChain(got.data);
    return [base, ...pieces].map((b) => b.toString()).join('+');
  };

  it('appends onto the generation named, loads base + pieces in order, replays them after a crash and checkpoints them as one file', async () => {
    const d = dir('append');
    let s = await open(d);
    const g0 = s.reserve();
    await s.save(1, 'volatile', g0, Buffer.from('base'));
    const g1 = s.reserve();
    await s.append(1, 'volatile', g0, g1, Buffer.from('p1'));
    const g2 = s.reserve();
    await s.append(1, 'volatile', g1, g2, Buffer.from('p2'));
    expect(s.generation(1, 'volatile')).toBe(g2);
    expect(await text(s, 1)).toBe('base+p1+p2');
    // Onto a generation the blob has left (twice, out of order), onto nothing: refused, nothing changes.
    await expect(s.append(1, 'volatile', g1, s.reserve(), Buffer.from('again'))).rejects.toMatchObject({ code: 'STALE' });
    await expect(s.append(2, 'volatile', g0, s.reserve(), Buffer.from('none'))).rejects.toBeInstanceOf(StoreError);
    expect(await text(s, 1)).toBe('base+p1+p2');
    const recs = logRecords(fs.readFileSync(path.join(d, WAL_FILE)));
    expect(recs.map((r) => r[2])).toEqual(['VWAL', 'VWAP', 'VWAP']);
    // The piece's record holds the piece, not the blob again.
    expect(recs[1]![1]).toBeLessThan(8 + 36 + 4 + 25 + 2 + 32 + 1);
    // Abandoned (a crash): the log alone holds the pieces.
    s = await open(d);
    expect(s.stats.replayed).toBe(3);
    expect(await text(s, 1)).toBe('base+p1+p2');
    const files = fs.readdirSync(d).filter((f) => f.endsWith('.blob'));
    expect(files).toEqual([`i1.volatile.g${g2}.blob`]);
    expect(fs.readFileSync(path.join(d, files[0]!)).subarray(0, 8).toString()).toBe('VTPMCHAN');
    // A restarted store holds no blob in memory: a piece is refused (the writer then saves whole).
    await expect(s.append(1, 'volatile', g2, s.reserve(), Buffer.from('p3'))).rejects.toMatchObject({ code: 'STALE' });
    await s.close();
  });

  it('a piece onto a checkpointed blob replays from its file; a crafted record onto the wrong base, repeated or out of order is skipped and said', async () => {
    const d = dir('append-replay');
    let s = await open(d);
    const g0 = s.reserve();
    await s.save(1, 'volatile', g0, Buffer.from('base'));
    // A checkpoint (as when a log half fills): the blob goes to a file and stays in memory for pieces.
    await s.checkpoint();
    expect(fs.readdirSync(d)).toContain(`i1.volatile.g${g0}.blob`);
    const g1 = s.reserve();
    await s.append(1, 'volatile', g0, g1, Buffer.from('p1'));
    expect(await text(s, 1)).toBe('base+p1');
    // Abandoned: the base is a file of the checkpoint, the piece a log record.
    const s2 = await open(d);
    expect(await text(s2, 1)).toBe('base+p1');
    await s2.close();
    // Records this store never wrote, MAC'd with its key, in the generation it appends to: onto the
    // old base again (the piece twice), onto a generation that never was (out of order), then the
    // right one. Abandoned again: replay applies the last one only.
    s = await open(d);
    const meta = JSON.parse(fs.readFileSync(path.join(d, 'meta')).subarray(12, -32).toString()) as { walGen: number; walHalf: number; clock: number };
    const g = s.generation(1, 'volatile')!;
    expect(g).toBe(g1);
    const key = walKey(macKey);
    const rec = (seq: number, onto: number, generation: number, data: string): Buffer =>
      encodeRecord({ gen: meta.walGen, seq, clock: meta.clock, saves: [], removes: [], appends: [{ instance: 1, kind: 'volatile', onto, generation, data: Buffer.from(data) }] }, key);
    const fd = fs.openSync(path.join(d, WAL_FILE), 'r+');
    fs.writeSync(fd, Buffer.concat([rec(1, g0, g + 1, 'dup'), rec(2, g + 50, g + 51, 'gap'), rec(3, g, g + 2, 'p2')]), 0, undefined, (meta.walGen % 2) * meta.walHalf);
    fs.closeSync(fd);
    const s3 = await open(d);
    expect(s3.stats.replayed).toBe(3);
    expect(s3.replayStop).toMatch(/skipped a piece for 1\.volatile onto generation \d+ \(the blob is at \d+\), a piece for 1\.volatile onto generation \d+/);
    expect(await text(s3, 1)).toBe('base+p1+p2');
    expect(s3.generation(1, 'volatile')).toBe(g + 2);
    await s3.close();
  });
});

describe('the store: appends across checkpoints', () => {
  it('concurrent saves and appends with a tiny log (checkpoints in the background and in line) lose nothing; a crash replays exactly what was acknowledged', async () => {
    const d = dir('append-ck');
    let s = await open(d, 4096);
    const want = new Map<number, Buffer[]>();
    await Promise.all(
      [1, 2, 3, 4].map(async (i) => {
        for (let round = 0; round < 6; round++) {
          let g = s.reserve();
          const base = Buffer.from(`b${i}.${round}.`.padEnd(200 + 60 * i, 'x'));
          await s.save(i, 'volatile', g, base);
          want.set(i, [base]);
          for (let n = 0; n < 15; n++) {
            const piece = Buffer.from(`p${i}.${round}.${n}`);
            const next = s.reserve();
            await s.append(i, 'volatile', g, next, piece);
            g = next;
            want.get(i)!.push(piece);
          }
        }
      }),
    );
    expect(s.stats.checkpoints).toBeGreaterThan(3);
    const check = async (t: GroupCommitStore): Promise<void> => {
      for (const [i, parts] of want) {
        const { base, pieces } = splitChain((await t.load(i, 'volatile'))!.data);
        expect([base, ...pieces].map(String)).toEqual(parts.map(String));
      }
    };
    await check(s);
    s = await open(d, 4096);
    await check(s);
    await s.close();
    s = await open(d, 4096);
    expect(s.stats.replayed).toBe(0);
    await check(s);
    await s.close();
  });
});

describe('the store: an append waiting for a background checkpoint', () => {
  it('keeps the blob it goes onto in memory though that checkpoint did not write it', async () => {
    const d = dir('append-bg');
    // The real directory store; its checkpoint commits wait at a gate this test opens.
    const dirOps = new DirOps(d);
    let gate: Promise<void> | null = null;
    let started = 0;
    const ops: StoreOps = {
      description: dirOps.description,
      prepare: () => dirOps.prepare(),
      readMeta: () => dirOps.readMeta(),
      commit: async (items, meta) => {
        started++;
        if (gate) await gate;
        return dirOps.commit(items, meta);
      },
      readBlob: (n) => dirOps.readBlob(n),
      removeBlobs: (n) => dirOps.removeBlobs(n),
      listBlobs: () => dirOps.listBlobs(),
      readLog: () => dirOps.readLog(),
      openLog: (n) => dirOps.openLog(n),
    };
    const s = (await GroupCommitStore.open(ops, macKey, () => [], { logBytes: 4096 })).store;
    const g0 = s.reserve();
    await s.save(1, 'volatile', g0, Buffer.alloc(100, 0x61));
    await s.checkpoint(); // the blob is a file now, kept in memory for pieces
    let release = (): void => {};
    gate = new Promise((r) => (release = r));
    // Fill the log half until a background checkpoint starts (only instance 2 is in it), held at the gate.
    const before = started;
    for (let i = 0; started === before && i < 10; i++) await s.save(2, 'permanent', s.reserve(), Buffer.alloc(900, i));
    expect(started).toBe(before + 1);
    // A piece too large for what is left of the new half: its batch waits for that checkpoint.
    const g1 = s.reserve();
    const appended = s.append(1, 'volatile', g0, g1, Buffer.alloc(1500, 0x62));
    await sleep(50);
    release();
    gate = null;
    await appended;
    expect(s.generation(1, 'volatile')).toBe(g1);
    const { base, pieces } = splitChain((await s.load(1, 'volatile'))!.data);
    expect([base, ...pieces].map((b) => b.length)).toEqual([100, 1500]);
    await s.close();
    const t = await open(d, 4096);
    expect(splitChain((await t.load(1, 'volatile'))!.data).pieces.map((p) => p.length)).toEqual([1500]);
    await t.close();
  });
});

describe('the writer over the real store and sealer', () => {
  const vm = { instance: 1, vmUuid: A, status: 'open' } as VmRecord;
  const opened = async (st: GroupCommitStore, sealer: Sealer): Promise<string> => {
    const got = (await st.load(1, 'volatile'))!;
    return sealer.open({ instance: 1, vmUuid: A, kind: 'volatile', generation: got.generation }, got.data).toString();
  };

  it('writes whole, then pieces; a blob idle for a log generation leaves memory and the next write is whole again', async () => {
    const st = await open(dir('writer'));
    const sealer = new Sealer(crypto.randomBytes(32));
    const held = new HeldVolatile(heldWriter(() => vm, st, sealer), 60_000, () => {});
    held.hold(1, Buffer.from('base.'));
    await held.flush();
    held.append(1, Buffer.from('r1.'));
    held.append(1, Buffer.from('r2.'));
    await held.flush();
    expect(st.stats.appends).toBe(1);
    expect(await opened(st, sealer)).toBe('base.r1.r2.');
    // Two checkpoints with no write between: the blob left the store's memory.
    await st.checkpoint();
    await st.checkpoint();
    held.append(1, Buffer.from('r3.'));
    await held.flush();
    expect(st.stats.appends).toBe(1);
    expect(st.stats.saves).toBe(2);
    expect(await opened(st, sealer)).toBe('base.r1.r2.r3.');
    held.stop();
    await st.close();
  });

  it(`writes whole again after ${MAX_PIECES} pieces, so a load never opens more`, async () => {
    const st = await open(dir('writer-max'));
    const sealer = new Sealer(crypto.randomBytes(32));
    const held = new HeldVolatile(heldWriter(() => vm, st, sealer), 60_000, () => {});
    held.hold(1, Buffer.from('b.'));
    await held.flush();
    let want = 'b.';
    for (let i = 0; i < MAX_PIECES + 1; i++) {
      held.append(1, Buffer.from(`${i}.`));
      want += `${i}.`;
      await held.flush();
    }
    expect(st.stats.appends).toBe(MAX_PIECES);
    expect(st.stats.saves).toBe(2);
    const got = (await st.load(1, 'volatile'))!;
    expect(splitChain(got.data).pieces).toHaveLength(0);
    expect(await opened(st, sealer)).toBe(want);
    held.stop();
    await st.close();
  });

  it('a durable save that replaces the held checkpoint while its piece is refused is never overwritten by the held bytes', async () => {
    const st = await open(dir('writer-race'));
    const sealer = new Sealer(crypto.randomBytes(32));
    let onAppend = (): void => {};
    // The real store, with a hook just after the writer queues its piece (where a SAVE_VOLATILE can arrive).
    const hooked: VtpmStore = {
      description: st.description,
      stats: st.stats,
      reserve: () => st.reserve(),
      save: (...a) => st.save(...a),
      append: (...a) => {
        const p = st.append(...a);
        onAppend();
        return p;
      },
      remove: (...a) => st.remove(...a),
      commitTable: () => st.commitTable(),
      load: (...a) => st.load(...a),
      flush: () => st.flush(),
      close: () => st.close(),
    };
    const held = new HeldVolatile(heldWriter(() => vm, hooked, sealer), 60_000, () => {});
    held.hold(1, Buffer.from('base.'));
    await held.flush();
    await st.checkpoint();
    await st.checkpoint(); // not in the store's memory: the piece will be refused
    let durable: Promise<void> | null = null;
    onAppend = () => {
      // What the daemon does for SAVE_VOLATILE: drop what is held, then save durably.
      held.drop(1);
      const g = st.reserve();
      durable = st.save(1, 'volatile', g, sealer.seal({ instance: 1, vmUuid: A, kind: 'volatile', generation: g }, Buffer.from('durable')));
    };
    held.append(1, Buffer.from('r1.'));
    await held.flush();
    await durable;
    await st.flush();
    expect(await opened(st, sealer)).toBe('durable');
    held.stop();
    await st.close();
  });
});

describe('the real manager: the background writer appends', () => {
  // No holding again after a restart: what a restarted manager loads must come from its store.
  const { start, now } = restartable({ reconnect: false });
  const uuid = (i: number): string => `a0000000-0000-4000-8000-${i.toString(16).padStart(12, '0')}`;
  const walRecords = (d: string): Array<[number, number, string]> => logRecords(fs.readFileSync(path.join(d, WAL_FILE)));

  it('after the first whole write, a flush logs only the appended bytes (a small VWAP record), and kill -9 then loads base + appends exactly', async () => {
    const stateDir = dir('wa-state');
    const runDir = dir('wa-run');
    let c = await start(stateDir, runDir);
    const { instance } = await c.open({ vmUuid: uuid(1), version: '2.0' });
    const base = crypto.randomBytes(11_000);
    await c.holdVolatile(instance, base);
    await sleep(HOLD_FLUSH_MS + 800);
    const before = walRecords(stateDir);
    expect(before.at(-1)![1]).toBeGreaterThan(11_000); // the whole checkpoint, sealed
    const records = Array.from({ length: 10 }, (_, i) => crypto.randomBytes(90 + i));
    for (const r of records) await c.appendVolatile(instance, r);
    await sleep(HOLD_FLUSH_MS + 800);
    const after = walRecords(stateDir).slice(before.length);
    // One record with one piece: ~945 appended bytes + the piece's header, salt, tag and the entry: not 11 KB again.
    expect(after.map((r) => r[2])).toEqual(['VWAP']);
    expect(after[0]![1]).toBeLessThan(945 + 61 + 32 + 25 + 48 + 44 + 40);
    c.disconnect();
    await now().stop('SIGKILL');
    c = await start(stateDir, runDir);
    expect(Buffer.from((await c.load(instance, 'volatile'))!)).toEqual(Buffer.concat([base, ...records]));
    // And once more after the checkpoint that restart took (the chain is a file now).
    c.disconnect();
    await now().stop('SIGKILL');
    c = await start(stateDir, runDir);
    expect(Buffer.from((await c.load(instance, 'volatile'))!)).toEqual(Buffer.concat([base, ...records]));
  });

  it.each([
    ['the default log', []],
    ['a 16 KiB log (checkpoints every few flushes)', ['--log-bytes', '16384']],
  ])('kill -9 at random points while guests hold and append, %s: each loads exactly a state it had, never older than one the writer had written', async (_what, extra) => {
    const stateDir = dir('wk-state');
    const runDir = dir('wk-run');
    const N = 3;
    let c = await start(stateDir, runDir, extra);
    const inst: number[] = [];
    for (let i = 0; i < N; i++) inst.push((await c.open({ vmUuid: uuid(10 + i), version: '2.0' })).instance);
    // Per instance: every state it was acknowledged in (held, or held then appended), in order.
    const states: Buffer[][] = inst.map(() => []);
    const current: Buffer[] = inst.map(() => Buffer.alloc(0));
    // Per instance: the index of the newest state known to be stored (a pause long enough for the
    // writer, or what a restart loaded): the least a restart may load; -1: none yet.
    const durable = inst.map(() => -1);
    for (let round = 0; round < 5; round++) {
      let stop = false;
      const work = (async () => {
        while (!stop) {
          for (let i = 0; i < N && !stop; i++) {
            try {
              if (current[i]!.length === 0 || Math.random() < 0.1) {
                const b = crypto.randomBytes(2000 + Math.floor(Math.random() * 2000));
                await c.holdVolatile(inst[i]!, b);
                current[i] = b;
              } else {
                const r = crypto.randomBytes(50 + Math.floor(Math.random() * 100));
                await c.appendVolatile(inst[i]!, r);
                current[i] = Buffer.concat([current[i]!, r]);
              }
              states[i]!.push(current[i]!);
            } catch {
              return; // the manager is gone
            }
          }
          if (Math.random() < 0.05) {
            await sleep(HOLD_FLUSH_MS + 900);
            if (!stop) for (let i = 0; i < N; i++) durable[i] = states[i]!.length - 1;
          } else await sleep(Math.random() * 20);
        }
      })();
      await sleep(300 + Math.random() * 3000);
      stop = true;
      c.disconnect();
      await now().stop('SIGKILL');
      await work;
      c = await start(stateDir, runDir, extra);
      for (let i = 0; i < N; i++) {
        const got = await c.load(inst[i]!, 'volatile');
        if (durable[i]! < 0 && got === null) {
          current[i] = Buffer.alloc(0); // never written: the guest starts over with a whole hold
          continue;
        }
        expect(got, `instance ${inst[i]} round ${round}: nothing loaded; manager log:\n${now().log.join('\n')}`).not.toBeNull();
        const at = states[i]!.findLastIndex((s) => s.equals(Buffer.from(got!)));
        expect(at, `instance ${inst[i]} round ${round}: loaded a state it never had`).toBeGreaterThanOrEqual(0);
        expect(at, `instance ${inst[i]} round ${round}: older than the state written before`).toBeGreaterThanOrEqual(durable[i]!);
        // Go on from what the store has (the guest's backend would hold it again).
        states[i]!.push(Buffer.from(got!));
        durable[i] = states[i]!.length - 1;
        current[i] = Buffer.from(got!);
        await c.holdVolatile(inst[i]!, current[i]!);
      }
    }
  }, 120_000);
});
