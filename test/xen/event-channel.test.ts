// Event channels: Xen's alloc_unbound / bind_interdomain / send / close semantics between domains.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../helpers/child.js';
import { Domain, ECS_interdomain, ECS_unbound, ECS_closed, EventChannelError } from '../../src/xen/index.js';
import { removeDir } from '../helpers/temp.js';
import { HC } from '../../src/xen/hypercall.js';
import { closeFd } from '../../native/unix-rights.js';

const dir = freshXenDir();
let fe: Domain;
let be: Domain;

beforeAll(async () => {
  fe = await Domain.create({ domid: 4, dir });
  be = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await fe.destroy();
  await be.destroy();
  removeDir(dir);
});

function code(f: () => unknown): string {
  try {
    f();
  } catch (err) {
    if (err instanceof EventChannelError) return err.code;
    throw err;
  }
  return 'ok';
}

function counter(dom: Domain, port: number): { n: number } {
  const c = { n: 0 };
  dom.evtchn.on(port, () => c.n++);
  return c;
}

/**
 * A fresh fe → be channel whose bind event has been delivered, with be's busy mode set to `windowUs`
 * (and the CPUs reported contended or not). `end()` closes it and turns be's busy mode off again.
 */
async function busyChannel(windowUs: number, contended = false): Promise<{ p: number; local: number; c: { n: number }; end: () => void }> {
  const p = fe.evtchn.allocUnbound(0);
  const local = be.evtchn.bindInterdomain(4, p);
  const c = counter(be, local);
  await sleep(20);
  be.evtchn.busyPollUs = windowUs;
  be.evtchn.busyContended = () => contended;
  return {
    p,
    local,
    c,
    end: () => {
      be.evtchn.busyPollUs = 0;
      be.evtchn.close(local);
      fe.evtchn.close(p);
    },
  };
}

describe('event channels', () => {
  it('binds only to an unbound port allocated for the binder: EINVAL otherwise, ESRCH for no domain', () => {
    const forOther = fe.evtchn.allocUnbound(7);
    expect(code(() => be.evtchn.bindInterdomain(4, forOther))).toBe('EINVAL');
    expect(code(() => be.evtchn.bindInterdomain(4, 200))).toBe('EINVAL'); // never allocated
    expect(code(() => be.evtchn.bindInterdomain(99, 1))).toBe('ESRCH');
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    expect(code(() => be.evtchn.bindInterdomain(4, p))).toBe('EINVAL'); // already bound
    be.evtchn.close(local);
    fe.evtchn.close(p);
    fe.evtchn.close(forOther);
  });

  it('starts the newly bound port pending, so a handler runs once right after the bind', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    expect(be.evtchn.status(local)).toMatchObject({ state: ECS_interdomain, remoteDom: 4, remotePort: p, pending: true });
    expect(fe.evtchn.status(p)).toMatchObject({ state: ECS_interdomain, remoteDom: 0, remotePort: local });
    const c = counter(be, local);
    await sleep(20);
    expect(c.n).toBe(1);
    be.evtchn.close(local);
    fe.evtchn.close(p);
  });

  it('drops a send on an unbound port silently', async () => {
    const p = fe.evtchn.allocUnbound(0);
    expect(() => fe.evtchn.send(p)).not.toThrow();
    expect(fe.evtchn.status(p).state).toBe(ECS_unbound);
    fe.evtchn.close(p);
  });

  it('delivers a send to the peer and coalesces sends made while it is still pending', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    const c = counter(be, local);
    await sleep(20); // the bind's own pending event
    c.n = 0;
    for (let i = 0; i < 50; i++) fe.evtchn.send(p); // all before the receiver's loop turns
    await sleep(50);
    expect(c.n).toBe(1);
    fe.evtchn.send(p);
    await sleep(50);
    expect(c.n).toBe(2);
    // And back the other way.
    const d = counter(fe, p);
    be.evtchn.send(local);
    await sleep(50);
    expect(d.n).toBe(1);
    be.evtchn.close(local);
    fe.evtchn.close(p);
  });

  it('close sends the peer back to unbound, awaiting a new bind; sends from it are then dropped', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    be.evtchn.close(local);
    expect(be.evtchn.status(local).state).toBe(ECS_closed);
    expect(fe.evtchn.status(p)).toMatchObject({ state: ECS_unbound, remoteDom: 0 });
    expect(() => fe.evtchn.send(p)).not.toThrow();
    const again = be.evtchn.bindInterdomain(4, p);
    expect(fe.evtchn.status(p).remotePort).toBe(again);
    be.evtchn.close(again);
    fe.evtchn.close(p);
  });

  it('a close posted without waiting returns while the hypervisor is stopped; the next call sees its effect', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    const hv = Number(fs.readFileSync(join(dir, 'hypervisor.pid'), 'latin1'));
    // Another process wakes the hypervisor again: a call that waited would block this loop till then.
    const waker = spawn('sh', ['-c', `sleep 1.5; kill -CONT ${hv}`], { stdio: 'ignore' });
    const woken = new Promise((r) => waker.once('exit', r));
    process.kill(hv, 'SIGSTOP');
    let took: number;
    try {
      const t0 = performance.now();
      be.evtchn.close(local, { wait: false });
      took = performance.now() - t0;
      // The next call on be's connection reads the posted call's reply first, then its own.
      expect(be.evtchn.status(local).state).toBe(ECS_closed);
    } finally {
      process.kill(hv, 'SIGCONT');
      await woken;
    }
    expect(fe.evtchn.status(p)).toMatchObject({ state: ECS_unbound, remoteDom: 0 });
    expect(took).toBeLessThan(500);
    fe.evtchn.close(p);
  });

  it('an alloc_unbound started returns while the hypervisor is stopped; a call made before its port is taken keeps its reply for it', async () => {
    const hv = Number(fs.readFileSync(join(dir, 'hypervisor.pid'), 'latin1'));
    const waker = spawn('sh', ['-c', `sleep 1.5; kill -CONT ${hv}`], { stdio: 'ignore' });
    const woken = new Promise((r) => waker.once('exit', r));
    process.kill(hv, 'SIGSTOP');
    let took: number;
    let port: number;
    let other: number;
    try {
      const t0 = performance.now();
      const take = fe.evtchn.startAllocUnbound(0);
      took = performance.now() - t0;
      // A call in between (it waits for the hypervisor): it reads the started call's reply first.
      other = fe.evtchn.allocUnbound(0);
      port = take();
    } finally {
      process.kill(hv, 'SIGCONT');
      await woken;
    }
    expect(took).toBeLessThan(500);
    expect(port).not.toBe(other);
    expect(fe.evtchn.status(port)).toMatchObject({ state: ECS_unbound, remoteDom: 0 });
    expect(fe.evtchn.status(other)).toMatchObject({ state: ECS_unbound, remoteDom: 0 });
    const local = be.evtchn.bindInterdomain(4, port);
    const got = counter(fe, port);
    await sleep(20);
    got.n = 0;
    be.evtchn.send(local);
    await sleep(50);
    expect(got.n).toBe(1);
    be.evtchn.close(local);
    fe.evtchn.close(port);
    fe.evtchn.close(other);
  });

  it('keeps an event pending until a handler is registered', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    await sleep(20);
    fe.evtchn.send(p);
    await sleep(30);
    expect(be.evtchn.status(local).pending).toBe(true);
    const c = counter(be, local);
    await sleep(20);
    expect(c.n).toBe(1);
    expect(be.evtchn.status(local).pending).toBe(false);
    be.evtchn.close(local);
    fe.evtchn.close(p);
  });

  it('hands each end its page, the read end of its own wake-up pipe and the write end of its peer\'s', async () => {
    const a = fe.hc.tryCall(HC.evtchn_alloc_unbound, [0]);
    const b = be.hc.tryCall(HC.evtchn_bind_interdomain, [4, a.r[0]!]);
    try {
      expect([a.status, b.status]).toEqual([0, 0]);
      expect([a.fds.length, b.fds.length]).toEqual([3, 3]);
      for (const fd of [...a.fds.slice(1), ...b.fds.slice(1)]) expect(fs.fstatSync(fd).isFIFO()).toBe(true);
      const rd = (fd: number): string => {
        const buf = Buffer.alloc(16);
        return buf.subarray(0, fs.readSync(fd, buf)).toString('hex');
      };
      // End 0 writes its peer's pipe; end 1 reads it from its own, and the other way round.
      fs.writeSync(a.fds[2]!, Buffer.from([0xa0]));
      expect(rd(b.fds[1]!)).toBe('a0');
      fs.writeSync(b.fds[2]!, Buffer.from([0xb1]));
      expect(rd(a.fds[1]!)).toBe('b1');
      // Nothing crosses over to the writer's own read end.
      expect(() => rd(a.fds[1]!)).toThrow(/EAGAIN/);
    } finally {
      for (const fd of [...a.fds, ...b.fds]) closeFd(fd);
      be.hc.tryCall(HC.evtchn_close, [b.r[0]!]);
      fe.hc.tryCall(HC.evtchn_close, [a.r[0]!]);
    }
  });

  it('gives a domain with more event-channel pages more ports (a backend with hundreds of guests)', async () => {
    const big = await Domain.create({ domid: 6, dir, geometry: { evtchnPages: 2 } });
    const small = await Domain.create({ domid: 7, dir });
    try {
      // One page: ports 1..255, then ENOSPC.
      const few: number[] = [];
      for (let i = 0; i < 255; i++) few.push(small.evtchn.allocUnbound(6));
      expect(code(() => small.evtchn.allocUnbound(6))).toBe('ENOSPC');
      for (const p of few) small.evtchn.close(p);
      // Two pages: port 300 exists, binds and delivers.
      const local: number[] = [];
      for (let i = 0; i < 300; i++) local.push(big.evtchn.allocUnbound(4));
      expect(local[299]).toBe(300);
      const remote = fe.evtchn.bindInterdomain(6, 300);
      const c = counter(big, 300);
      await sleep(20);
      c.n = 0;
      fe.evtchn.send(remote);
      await sleep(50);
      expect(c.n).toBe(1);
      fe.evtchn.close(remote);
    } finally {
      await big.destroy();
      await small.destroy();
    }
  });
});

describe('event-channel masks (busy-polling ends)', () => {
  it('collects sends to a masked port without a wake-up write; unmask delivers them once', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    const c = counter(be, local);
    await sleep(20); // the bind's own pending event
    expect(c.n).toBe(1);
    fe.evtchn.send(p); // opens the wake-up connection
    await sleep(20);
    expect(c.n).toBe(2);
    be.evtchn.mask(local);
    const writes = vi.spyOn(fs, 'writeSync');
    try {
      fe.evtchn.send(p);
      fe.evtchn.send(p);
      fe.evtchn.send(p);
      expect(writes).not.toHaveBeenCalled();
    } finally {
      writes.mockRestore();
    }
    await sleep(20);
    expect(c.n).toBe(2);
    expect(be.evtchn.status(local)).toMatchObject({ pending: true, masked: true });
    be.evtchn.unmask(local);
    await sleep(20);
    expect(c.n).toBe(3);
    expect(be.evtchn.status(local)).toMatchObject({ pending: false, masked: false });
    // Unmasked again: the next send is a 0→1 edge and wakes the process as before.
    fe.evtchn.send(p);
    await sleep(20);
    expect(c.n).toBe(4);
    be.evtchn.close(local);
    fe.evtchn.close(p);
  });

  it('busy mode: a woken domain keeps its ports masked for its quiet window and finds sends itself, with no wake-up write', async () => {
    const { p, local, c, end } = await busyChannel(300_000); // a window long enough to look at from a test
    expect(c.n).toBe(1);
    const writes = vi.spyOn(fs, 'writeSync');
    try {
      // The delivery above (busy mode was off then) left the port unmasked: this send wakes dom0.
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(2);
      const woke = writes.mock.calls.length;
      expect(woke).toBeGreaterThan(0);
      // Woken: busy now, its port masked in the shared table, so the next sends write nothing...
      expect(be.evtchn.status(local)).toMatchObject({ masked: true, pending: false });
      fe.evtchn.send(p);
      expect(writes.mock.calls.length).toBe(woke);
      await sleep(20);
      // ...and its own poller delivers them.
      expect(c.n).toBe(3);
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(4);
      expect(writes.mock.calls.length).toBe(woke);
      // After a quiet window it unmasks and sleeps: sends wake it with a write again.
      await sleep(400);
      expect(be.evtchn.status(local)).toMatchObject({ masked: false, pending: false });
      fe.evtchn.send(p);
      expect(writes.mock.calls.length).toBe(woke + 1);
      await sleep(20);
      expect(c.n).toBe(5);
    } finally {
      writes.mockRestore();
      end();
    }
  });

  it('busy mode never delivers a port its channel masked; unmask in busy mode hands it to the poller', async () => {
    const { p, local, c, end } = await busyChannel(300_000);
    try {
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(2); // woken, busy
      be.evtchn.mask(local); // the channel polls its ring itself now
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(2);
      expect(be.evtchn.status(local)).toMatchObject({ masked: true, pending: true });
      be.evtchn.unmask(local);
      // Still busy: the table keeps the mask (no wake-ups needed), the poller delivers the pending send.
      expect(be.evtchn.status(local).masked).toBe(true);
      await sleep(20);
      expect(c.n).toBe(3);
      await sleep(350);
      expect(be.evtchn.status(local)).toMatchObject({ masked: false, pending: false });
    } finally {
      end();
    }
  });

  it('busy mode with the CPUs contended: leaves at the first turn that finds nothing', async () => {
    const { p, local, c, end } = await busyChannel(300_000, true);
    try {
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(2);
      // Long before the 300 ms window: unmasked already, so the next send is a wake-up again.
      expect(be.evtchn.status(local).masked).toBe(false);
      const writes = vi.spyOn(fs, 'writeSync');
      try {
        fe.evtchn.send(p);
        expect(writes).toHaveBeenCalledTimes(1);
      } finally {
        writes.mockRestore();
      }
      await sleep(20);
      expect(c.n).toBe(3);
    } finally {
      end();
    }
  });

  it('busyPollUs 0: never busy, every 0→1 edge is one wake-up write', async () => {
    const { p, local, c, end } = await busyChannel(0);
    fe.evtchn.send(p);
    await sleep(20);
    const writes = vi.spyOn(fs, 'writeSync');
    try {
      for (let i = 0; i < 3; i++) {
        fe.evtchn.send(p);
        await sleep(20);
        expect(be.evtchn.status(local).masked).toBe(false);
      }
      expect(writes).toHaveBeenCalledTimes(3);
    } finally {
      writes.mockRestore();
    }
    expect(c.n).toBe(5);
    end();
  });

  it('reads wake-ups into one scratch buffer: a delivery emits no stream data event', async () => {
    const { p, c, end } = await busyChannel(0);
    const emits = vi.spyOn(net.Socket.prototype, 'emit');
    try {
      for (let i = 0; i < 3; i++) {
        fe.evtchn.send(p);
        await sleep(20);
      }
      expect(c.n).toBe(4); // the bind's event and the three sends, each a wake-up read
      expect(emits.mock.calls.filter(([ev]) => (ev as string) === 'data')).toEqual([]);
    } finally {
      emits.mockRestore();
      end();
    }
  });

  it('a peer flooding its wake-up pipe with raw bytes runs no handler; its next real send is delivered once', async () => {
    const { p, c, end } = await busyChannel(0);
    const writes = vi.spyOn(fs, 'writeSync');
    let fd: number;
    try {
      fe.evtchn.send(p);
      fd = writes.mock.calls[0]![0] as number; // the wake-up pipe send() wrote to
    } finally {
      writes.mockRestore();
    }
    await sleep(20);
    expect(c.n).toBe(2);
    // Bytes without the pending bit, as many as the pipe takes (it is non-blocking), again and again.
    const junk = Buffer.alloc(65536, 0xff);
    let flooded = 0;
    for (let round = 0; round < 20; round++) {
      try {
        for (;;) flooded += fs.writeSync(fd, junk);
      } catch (err) {
        expect((err as NodeJS.ErrnoException).code).toBe('EAGAIN');
      }
      await sleep(2);
    }
    expect(flooded).toBeGreaterThan(65536);
    await sleep(50);
    expect(c.n).toBe(2);
    fe.evtchn.send(p);
    await sleep(20);
    expect(c.n).toBe(3);
    end();
  });

  it('consume() takes the pending bit a poller saw, so unmask delivers nothing', async () => {
    const p = fe.evtchn.allocUnbound(0);
    const local = be.evtchn.bindInterdomain(4, p);
    const c = counter(be, local);
    await sleep(20);
    be.evtchn.mask(local);
    fe.evtchn.send(p);
    expect(be.evtchn.consume(local)).toBe(true);
    expect(be.evtchn.consume(local)).toBe(false);
    be.evtchn.unmask(local);
    await sleep(20);
    expect(c.n).toBe(1); // only the bind's event
    be.evtchn.close(local);
    fe.evtchn.close(p);
  });

  it('tells a poller when another bound port is pending', async () => {
    const p1 = fe.evtchn.allocUnbound(0);
    const p2 = fe.evtchn.allocUnbound(0);
    const l1 = be.evtchn.bindInterdomain(4, p1);
    const l2 = be.evtchn.bindInterdomain(4, p2);
    counter(be, l1);
    counter(be, l2);
    await sleep(20);
    be.evtchn.mask(l1);
    be.evtchn.mask(l2);
    expect(be.evtchn.otherPending(l1)).toBe(false);
    fe.evtchn.send(p1);
    expect(be.evtchn.otherPending(l1)).toBe(false); // its own port does not count
    fe.evtchn.send(p2);
    expect(be.evtchn.otherPending(l1)).toBe(true);
    for (const l of [l1, l2]) {
      be.evtchn.unmask(l);
      be.evtchn.close(l);
    }
    fe.evtchn.close(p1);
    fe.evtchn.close(p2);
  });

  it('otherPendingSome looks at a few ports per call, resuming where it stopped, and finds a pending one within one sweep', async () => {
    const n = 40;
    const fps: number[] = [];
    const lps: number[] = [];
    for (let i = 0; i < n; i++) {
      fps.push(fe.evtchn.allocUnbound(0));
      lps.push(be.evtchn.bindInterdomain(4, fps[i]!));
      counter(be, lps[i]!);
    }
    await sleep(20);
    for (const l of lps) be.evtchn.mask(l);
    const own = lps[0]!;
    // Nothing else pending: no call says so, however many.
    for (let i = 0; i < 10; i++) expect(be.evtchn.otherPendingSome(own, 16)).toBe(false);
    fe.evtchn.send(fps[0]!);
    for (let i = 0; i < 10; i++) expect(be.evtchn.otherPendingSome(own, 16)).toBe(false); // its own port does not count
    // Any other port, wherever the cursor stands, is seen within ceil(40 / 16) = 3 calls, and not by
    // a call that looks at too few ports to reach it.
    for (const target of [1, 17, 39]) {
      fe.evtchn.send(fps[target]!);
      let calls = 0;
      while (!be.evtchn.otherPendingSome(own, 16)) expect(++calls).toBeLessThan(3);
      be.evtchn.consume(lps[target]!);
    }
    fe.evtchn.send(fps[20]!);
    expect(be.evtchn.otherPendingSome(own, 0)).toBe(false);
    expect(be.evtchn.otherPending(own)).toBe(true);
    for (let i = 0; i < n; i++) {
      be.evtchn.unmask(lps[i]!);
      be.evtchn.close(lps[i]!);
      fe.evtchn.close(fps[i]!);
    }
  });

  it('a poller\'s otherPending sees a port bound after its last look, and no longer one closed since', async () => {
    const p1 = fe.evtchn.allocUnbound(0);
    const l1 = be.evtchn.bindInterdomain(4, p1);
    counter(be, l1);
    await sleep(20);
    be.evtchn.mask(l1);
    expect(be.evtchn.otherPending(l1)).toBe(false);
    // Bound after that look: its pending bit counts at once.
    const p2 = fe.evtchn.allocUnbound(0);
    const l2 = be.evtchn.bindInterdomain(4, p2);
    counter(be, l2);
    await sleep(20);
    be.evtchn.mask(l2);
    fe.evtchn.send(p2);
    expect(be.evtchn.otherPending(l1)).toBe(true);
    // Closed: its bit no longer counts (its page is gone).
    be.evtchn.close(l2);
    expect(be.evtchn.otherPending(l1)).toBe(false);
    be.evtchn.unmask(l1);
    be.evtchn.close(l1);
    fe.evtchn.close(p1);
    fe.evtchn.close(p2);
  });
  it('says where each end runs in its channel page: a poller sees its peer runnable on its own CPU (published, or woken by its send) and not once it rests', async () => {
    // Both ends live on this thread; pinned, they stay on one CPU between the publishing and the look.
    execFileSync('taskset', ['-a', '-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
    try {
      const p = fe.evtchn.allocUnbound(0);
      const local = be.evtchn.bindInterdomain(4, p);
      const c = counter(be, local);
      await sleep(20); // the bind's own event, delivered: be said it runs here
      expect(c.n).toBe(1);
      expect(fe.evtchn.sharesCpu(p)).toBe(true);
      be.evtchn.resting(local);
      expect(fe.evtchn.sharesCpu(p)).toBe(false);
      // A send that writes a wake-up makes the peer runnable on the CPU it last ran on.
      fe.evtchn.send(p);
      expect(fe.evtchn.sharesCpu(p)).toBe(true);
      await sleep(20);
      expect(c.n).toBe(2);
      be.evtchn.resting(local);
      // A masked peer is polling already: the send writes no wake-up and says nothing about it.
      be.evtchn.mask(local);
      fe.evtchn.send(p);
      expect(fe.evtchn.sharesCpu(p)).toBe(false);
      // Its own look says it runs (here): the other end sees that too.
      expect(be.evtchn.sharesCpu(local)).toBe(true);
      expect(fe.evtchn.sharesCpu(p)).toBe(true);
      be.evtchn.consume(local);
      be.evtchn.unmask(local);
      be.evtchn.close(local);
      // A closed port says nothing.
      expect(be.evtchn.sharesCpu(local)).toBe(false);
      fe.evtchn.close(p);
    } finally {
      execFileSync('taskset', ['-a', '-p', '-c', `0-${os.cpus().length - 1}`, String(process.pid)], { stdio: 'ignore' });
    }
  });
  it('busy mode ends at its next turn, not after its quiet window, once a peer waits for the CPU it spins on', async () => {
    execFileSync('taskset', ['-a', '-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
    const { p, local, c, end } = await busyChannel(300_000);
    try {
      fe.evtchn.send(p);
      await sleep(20);
      expect(c.n).toBe(2);
      expect(be.evtchn.status(local).masked).toBe(true); // woken, busy for up to 300 ms
      // The guest end says it runs on this CPU (as a poll of its own does): dom0's poller gives way.
      expect(fe.evtchn.sharesCpu(p)).toBe(true);
      await sleep(20);
      expect(be.evtchn.status(local).masked).toBe(false);
      fe.evtchn.resting(p);
    } finally {
      end();
      execFileSync('taskset', ['-a', '-p', '-c', `0-${os.cpus().length - 1}`, String(process.pid)], { stdio: 'ignore' });
    }
  });
});
