// Two (and three) real processes sharing a ring through the grant table and an event channel.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Child, freshXenDir } from '../helpers/child.js';
import { Domain, EchoFrontend, GNTST, GrantError, domainExists } from '../../src/xen/index.js';
import { removeDir } from '../helpers/temp.js';

const dir = freshXenDir();
const env = { VTPM_XEN_DIR: dir };
let back: Child;
let front: Child;
let offer: { frontDomid: number; refs: number[]; port: number };

beforeAll(async () => {
  back = new Child('src/cli/ring-peer.js', ['back', '0'], env);
  await back.next('ready');
  front = new Child('src/cli/ring-peer.js', ['front', '5', '0'], env);
  offer = (await front.next('ready')).offer as typeof offer;
  await back.request({ kind: 'offer', offer }, 'connected');
});

afterAll(async () => {
  await Promise.all([front?.stop(), back?.stop()]);
  removeDir(dir);
});

describe('ring between two processes', () => {
  it('destroys a domain when its process dies, and its domid can be created again', async () => {
    const peerProc = new Child('src/cli/ring-peer.js', ['back', '4'], env);
    try {
      await peerProc.next('ready');
      expect(await domainExists(dir, 4)).toBe(true);
      peerProc.proc.kill('SIGKILL');
      await peerProc.exited;
      for (let i = 0; i < 200 && (await domainExists(dir, 4)); i++) await new Promise((r) => setTimeout(r, 10));
      expect(await domainExists(dir, 4)).toBe(false);
      const again = await Domain.create({ domid: 4, dir });
      await again.destroy();
    } finally {
      await peerProc.stop();
    }
  });

  it('exchanges 100 000 requests, every response matching its request', async () => {
    const r = await front.request({ kind: 'run', count: 100_000, inflight: 32 }, 'ran');
    expect(r).toMatchObject({ count: 100_000, bad: 0 });
  });

  it('exchanges requests one at a time (every one needs a notification each way)', async () => {
    const r = await front.request({ kind: 'run', count: 2_000, inflight: 1 }, 'ran');
    expect(r).toMatchObject({ count: 2_000, bad: 0 });
  });

  it('refuses to let the frontend revoke its ring grant while the backend has it mapped', async () => {
    const r = await front.request({ kind: 'revoke' }, 'revoked');
    expect(r.ok).toBe(false);
  });

  it('answers a map by the wrong domain with GNTST_general_error (-1)', async () => {
    // Domain 9 is not the domain the ring was granted to.
    const intruder = await Domain.create({ domid: 9, dir });
    try {
      expect(() => intruder.mapper.map(offer.frontDomid, offer.refs[0]!)).toThrow(GrantError);
      try {
        intruder.mapper.map(offer.frontDomid, offer.refs[0]!);
      } catch (err) {
        expect((err as GrantError).status).toBe(GNTST.general_error);
      }
    } finally {
      await intruder.destroy();
    }
  });

  it('rejects a frontend that writes garbage indices while another frontend keeps being served', async () => {
    const good = new Child('src/cli/ring-peer.js', ['front', '6', '0'], env);
    try {
      const goodOffer = (await good.next('ready')).offer as typeof offer;
      await back.request({ kind: 'offer', offer: goodOffer }, 'connected');
      const rejected = back.next('rejected');
      await front.request({ kind: 'garbage-indices' }, 'garbage-sent');
      const rej = await rejected;
      expect(rej.frontDomid).toBe(5);
      expect(String(rej.reason)).toMatch(/^dom5: bogus ring requests: req_prod \d+ is \d+ past rsp_prod_pvt/);
      const r = await good.request({ kind: 'run', count: 5_000, inflight: 8 }, 'ran');
      expect(r).toMatchObject({ count: 5_000, bad: 0 });
    } finally {
      await good.stop();
    }
  });

  it('releases the grant once the backend unmaps, so the frontend can revoke it', async () => {
    await back.request({ kind: 'disconnect', frontDomid: 5 }, 'disconnected');
    const r = await front.request({ kind: 'revoke' }, 'revoked');
    expect(r.ok).toBe(true);
  });

  it('answers a polling frontend without a wake-up, and still wakes it once polling stands down', async () => {
    // This process is the frontend (domain 7); the backend child polls too (VTPM_POLL_US default).
    const dom = await Domain.create({ domid: 7, dir });
    let contended = false;
    const f = new EchoFrontend(dom, 0, { pollUs: 2_000, contended: () => contended });
    try {
      await back.request({ kind: 'offer', offer: f.offer() }, 'connected');
      // Polling: the answer is taken from the ring inside flush(), before request() returns, so the
      // promise is already settled when we look (a notification would only arrive on a later turn).
      let polled = 0;
      for (let i = 0; i < 200; i++) {
        let settled = false;
        const p = f.request(i).then((v) => ((settled = true), v));
        await Promise.resolve();
        if (settled) polled++;
        expect(await p).toBe(i + 1);
      }
      expect(polled).toBeGreaterThan(100);
      expect(dom.evtchn.status(f.port).masked).toBe(true);
      // Under CPU pressure the frontend stops polling: its port must be unmasked so the answer wakes it.
      contended = true;
      const within = <T>(p: Promise<T>): Promise<T | 'no answer in 5 s'> =>
        Promise.race([p, new Promise<'no answer in 5 s'>((r) => setTimeout(() => r('no answer in 5 s'), 5_000).unref())]);
      for (let i = 0; i < 50; i++) expect(await within(f.request(1000 + i))).toBe(1001 + i);
    } finally {
      await back.request({ kind: 'disconnect', frontDomid: 7 }, 'disconnected');
      await dom.destroy();
    }
  });
});
