// Event channels: Xen's alloc_unbound / bind_interdomain / send / close semantics between domains.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../helpers/child.js';
import { Domain, ECS_interdomain, ECS_unbound, ECS_closed, EventChannelError } from '../../src/xen/index.js';

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
  rmSync(dir, { recursive: true, force: true });
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
