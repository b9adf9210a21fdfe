// HOLD_VOLATILE (ordinal 11): a volatile checkpoint acknowledged once the manager holds it in memory.
// Two processes hold it from then on (the client and the manager), so it survives any one crash: the
// manager serves it to LOAD_VOLATILE and writes it in the background, at CLOSE and at shutdown; a
// client re-holds its latest checkpoints on a restarted manager before anything else.
import { describe, expect, it, vi } from 'vitest';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ManagerClient } from '../../src/manager/client.js';
import { connectPair } from '../../src/manager/fifo-client.js';
import { Ord, Status, encodeRequest, type Frame } from '../../src/manager/wire.js';
import { perTest, startManager, type RunningManager } from './helpers.js';
import { HOLD_FLUSH_MS } from '../../src/manager/daemon.js';
import { getFromSocket } from '../../src/util/metrics-http.js';
import { removeDir, tempDir } from '../helpers/temp.js';

const VM = '6f1b0d52-6c1e-4b8e-9a57-3f0c2f7d9a11';
const { clients, managers, manager } = perTest();

async function client(m: RunningManager): Promise<ManagerClient> {
  const c = await ManagerClient.connect(m.runDir);
  clients.push(c);
  return c;
}

async function restart(m: RunningManager): Promise<RunningManager> {
  const n = await startManager(m.stateDir, m.runDir);
  managers.push(n);
  return n;
}

describe('vtpm manager: HOLD_VOLATILE', () => {
  it('answers the raw ordinal with success, serves the held blob to LOAD_VOLATILE, and refuses an empty one', async () => {
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    const p = await connectPair(m.runDir, { name: 'raw' });
    const frames: Frame[] = [];
    p.reader.on('frame', (f) => frames.push(f));
    const next = async (n: number): Promise<Frame> => {
      while (frames.length < n) await sleep(2);
      return frames[n - 1]!;
    };
    // instance | tag 01c1 | size 10 + 3 | ordinal 0000000b | blob "abc"
    const req = encodeRequest(instance, Ord.HOLD_VOLATILE, Buffer.from('abc'));
    expect(Buffer.from(req).toString('hex')).toBe(instance.toString(16).padStart(8, '0') + '01c1' + '0000000d' + '0000000b' + '616263');
    p.writer.write(req);
    expect(await next(1)).toMatchObject({ instance, code: Status.SUCCESS });
    expect(Buffer.from((await next(1)).params).length).toBe(0);
    p.writer.write(encodeRequest(instance, Ord.LOAD_VOLATILE));
    expect(Buffer.from((await next(2)).params).toString()).toBe('abc');
    p.writer.write(encodeRequest(instance, Ord.HOLD_VOLATILE));
    expect((await next(3)).code).toBe(Status.BAD_PARAMETER);
    p.reader.close();
    p.writer.destroy();
  });

  it('APPEND_VOLATILE (12) adds bytes to the held checkpoint, and is refused with nothing held', async () => {
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    const p = await connectPair(m.runDir, { name: 'raw-append' });
    const frames: Frame[] = [];
    p.reader.on('frame', (f) => frames.push(f));
    const next = async (n: number): Promise<Frame> => {
      while (frames.length < n) await sleep(2);
      return frames[n - 1]!;
    };
    const append = encodeRequest(instance, Ord.APPEND_VOLATILE, Buffer.from('de'));
    expect(Buffer.from(append).toString('hex')).toBe(instance.toString(16).padStart(8, '0') + '01c1' + '0000000c' + '0000000c' + '6465');
    p.writer.write(append);
    expect((await next(1)).code).toBe(Status.BAD_PARAMETER);
    p.writer.write(encodeRequest(instance, Ord.HOLD_VOLATILE, Buffer.from('abc')));
    p.writer.write(append);
    p.writer.write(encodeRequest(instance, Ord.LOAD_VOLATILE));
    expect((await next(3)).code).toBe(Status.SUCCESS);
    expect(Buffer.from((await next(4)).params).toString()).toBe('abcde');
    p.reader.close();
    p.writer.destroy();
  });

  it('answers in request order though a hold or append is answered at once and a load behind the store', async () => {
    // Holds and appends are answered in the frame's own callback unless a reply is queued ahead of
    // them: here LOADNVM goes to the store first, so the append behind it must wait its turn.
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    const p = await connectPair(m.runDir, { name: 'raw-order' });
    const frames: Frame[] = [];
    p.reader.on('frame', (f) => frames.push(f));
    const next = async (n: number): Promise<Frame> => {
      while (frames.length < n) await sleep(2);
      return frames[n - 1]!;
    };
    p.writer.write(encodeRequest(instance, Ord.HOLD_VOLATILE, Buffer.from('abc')));
    expect((await next(1)).code).toBe(Status.SUCCESS);
    p.writer.write(
      Buffer.concat([
        encodeRequest(instance, Ord.LOADNVM),
        encodeRequest(instance, Ord.APPEND_VOLATILE, Buffer.from('x')),
        encodeRequest(instance, Ord.APPEND_VOLATILE),
        encodeRequest(instance, Ord.LOAD_VOLATILE),
        encodeRequest(instance, Ord.APPEND_VOLATILE, Buffer.from('y')),
      ]),
    );
    const [nvm, append, empty, load, last] = [await next(2), await next(3), await next(4), await next(5), await next(6)];
    expect(nvm.code).toBe(Status.SUCCESS);
    expect(nvm.params.length).toBeGreaterThan(1000); // the manufactured permanent state
    expect([append.code, append.params.length]).toEqual([Status.SUCCESS, 0]);
    expect(empty.code).toBe(Status.BAD_PARAMETER);
    expect(Buffer.from(load.params).toString()).toBe('abcx');
    expect([last.code, last.params.length]).toEqual([Status.SUCCESS, 0]);
    p.writer.write(encodeRequest(instance, Ord.LOAD_VOLATILE));
    expect(Buffer.from((await next(7)).params).toString()).toBe('abcxy');
    p.reader.close();
    p.writer.destroy();
  });

  it('a durable SAVE_VOLATILE or a DELETE_STATE replaces what is held', async () => {
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    await c.holdVolatile(instance, Buffer.from('held-1'));
    await c.store(instance, 'volatile', Buffer.from('durable-2'));
    expect(Buffer.from((await c.load(instance, 'volatile'))!).toString()).toBe('durable-2');
    await c.holdVolatile(instance, Buffer.from('held-3'));
    await c.delete(instance, 'volatile');
    expect(await c.load(instance, 'volatile')).toBeNull();
  });

  it('writes what it holds in the background: a later kill -9 of the manager loses nothing', async () => {
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    await c.holdVolatile(instance, Buffer.from('held-in-background'));
    // The holder goes away (a backend killed): the manager still serves, then writes, its copy.
    c.disconnect();
    const other = await client(m);
    expect(Buffer.from((await other.load(instance, 'volatile'))!).toString()).toBe('held-in-background');
    // Written within HOLD_FLUSH_MS (1 s) of being held.
    await sleep(HOLD_FLUSH_MS + 500);
    await m.stop('SIGKILL');
    const n = await restart(m);
    const after = await client(n);
    expect(Buffer.from((await after.load(instance, 'volatile'))!).toString()).toBe('held-in-background');
  });

  it('a client holds its checkpoint again on a restarted manager, unasked, before any other request', async () => {
    const m = await manager();
    const c = await client(m);
    const { instance } = await c.open({ vmUuid: VM, version: '2.0' });
    await c.store(instance, 'volatile', Buffer.from('durable-old'));
    await c.holdVolatile(instance, Buffer.from('held-new'));
    // Killed at once: the held checkpoint was only in the manager's memory (and the client's).
    await m.stop('SIGKILL');
    const n = await restart(m);
    await c.open({ vmUuid: VM, version: '2.0' });
    // Another process reads it: only the client's own re-hold can have put it there.
    const other = await client(n);
    let got = '';
    for (let i = 0; i < 100 && got !== 'held-new'; i++, await sleep(20)) got = Buffer.from((await other.load(instance, 'volatile'))!).toString();
    expect(got).toBe('held-new');
    // And it is written at CLOSE: durable across a further kill -9.
    await other.close(instance);
    await n.stop('SIGKILL');
    const o = await restart(n);
    const last = await client(o);
    await last.open({ vmUuid: VM, version: '2.0' });
    expect(Buffer.from((await last.load(instance, 'volatile'))!).toString()).toBe('held-new');
  });

  it('a client that loaded a held checkpoint holds it too: a manager restart before it was written loses nothing', async () => {
    const m = await manager();
    const first = await client(m);
    const { instance } = await first.open({ vmUuid: VM, version: '2.0' });
    await first.holdVolatile(instance, Buffer.from('held-then-loaded'));
    // The holder dies (a backend killed); its successor loads the checkpoint from the manager's memory.
    first.disconnect();
    const next = await client(m);
    const loaded = (await next.load(instance, 'volatile'))!;
    expect(Buffer.from(loaded).toString()).toBe('held-then-loaded');
    // What a JournalStore does with every volatile checkpoint it loads.
    next.adoptHeld(instance, loaded);
    // The manager dies before its background write: the successor's copy is held again on the new one.
    await m.stop('SIGKILL');
    const n = await restart(m);
    await next.open({ vmUuid: VM, version: '2.0' });
    const other = await client(n);
    let got = '';
    for (let i = 0; i < 100 && got !== 'held-then-loaded'; i++, await sleep(20)) got = Buffer.from((await other.load(instance, 'volatile')) ?? Buffer.alloc(0)).toString();
    expect(got).toBe('held-then-loaded');
  });

  it('sends the checkpoints of one loop turn in one write, though each guest\'s event is a callback of its own', async () => {
    const m = await manager();
    const c = await client(m);
    const a = (await c.open({ vmUuid: VM, version: '2.0' })).instance;
    const b = (await c.open({ vmUuid: '0c3f9a4e-2b7d-4e51-8f6a-1d2e3f4a5b6c', version: '2.0' })).instance;
    await Promise.all([c.holdVolatile(a, Buffer.from('A')), c.holdVolatile(b, Buffer.from('B'))]);
    // Eight appends, each from its own macrotask of the same phase, as a backend's ring events arrive.
    // Node's stream internals, untyped in @types/node.
    const proto = net.Socket.prototype as unknown as { _write: (...a: unknown[]) => void; _writev: (chunks: unknown[], cb: () => void) => void };
    const writes = vi.spyOn(proto, '_write');
    const writevs = vi.spyOn(proto, '_writev');
    try {
      const acks = await new Promise<Array<Promise<void>>>((resolve) => {
        const out: Array<Promise<void>> = [];
        for (let i = 0; i < 8; i++) setImmediate(() => out.push(c.appendVolatile(i % 2 ? b : a, Buffer.from([0x30 + i]))) === 8 && resolve(out));
      });
      await Promise.all(acks);
      expect(writes.mock.calls.length + writevs.mock.calls.length).toBe(1);
      expect(writevs.mock.calls[0]![0].length).toBe(8);
    } finally {
      writes.mockRestore();
      writevs.mockRestore();
    }
    expect(Buffer.from((await c.load(a, 'volatile'))!).toString()).toBe('A0246');
    expect(Buffer.from((await c.load(b, 'volatile'))!).toString()).toBe('B1357');
  });

  it('writes the checkpoints of many guests in the background in one group commit, not one commit (and fdatasync) each', async () => {
    const runDir = tempDir('held-run');
    const stateDir = tempDir('held-state');
    const socket = path.join(runDir, 'manager-metrics.sock');
    process.env.VTPM_METRICS_SOCKET = socket;
    let m: RunningManager;
    try {
      m = await manager(stateDir, runDir);
    } finally {
      delete process.env.VTPM_METRICS_SOCKET;
    }
    try {
      /** Group commits the manager's store has made, log records and checkpoints alike. */
      const commits = async (): Promise<number> => {
        const text = await getFromSocket(socket, '/metrics');
        return [...text.matchAll(/^vtpm_manager_commits_total\{[^}]*\} (\d+)$/gm)].reduce((a, x) => a + Number(x[1]), 0);
      };
      const c = await client(m);
      const N = 12;
      const instances: number[] = [];
      for (let i = 0; i < N; i++) instances.push((await c.open({ vmUuid: `5e1d0c2a-0000-4000-8000-${String(i).padStart(12, '0')}`, version: '2.0' })).instance);
      const before = await commits();
      await Promise.all(instances.map((inst, i) => c.holdVolatile(inst, Buffer.from(`held-${i}`))));
      // Holding is memory only; the background writer runs HOLD_FLUSH_MS after the first hold.
      expect(await commits()).toBe(before);
      let after = before;
      for (let t = 0; t < 50 && after === before; t++, await sleep(100)) after = await commits();
      await sleep(HOLD_FLUSH_MS / 2);
      after = await commits();
      // One flush of twelve checkpoints: one commit (two if the timer split the holds), never twelve.
      expect(after - before).toBeGreaterThanOrEqual(1);
      expect(after - before).toBeLessThanOrEqual(2);
      // And every one of them was written: a kill -9 now loses none.
      await m.stop('SIGKILL');
      const n = await restart(m);
      const r = await client(n);
      for (let i = 0; i < N; i++) {
        await r.open({ vmUuid: `5e1d0c2a-0000-4000-8000-${String(i).padStart(12, '0')}`, version: '2.0' });
        expect(Buffer.from((await r.load(instances[i]!, 'volatile'))!).toString()).toBe(`held-${i}`);
      }
    } finally {
      for (const x of managers) await x.stop('SIGKILL');
      removeDir(runDir);
      removeDir(stateDir);
    }
  });
});
