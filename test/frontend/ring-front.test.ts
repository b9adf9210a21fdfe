// A ring frontend's pages across a close and a new ring (a resume): once the backend has unmapped them
// and every grant has ended, the frames stay backed and the next ring reuses them, zeroed, without a
// hypercall; a frame the backend still maps goes back to the hypervisor (decrease_reservation) instead.
// Once a ring is set up, a spare run for the next one is backed while idle, so a resume never populates.
import { describe, expect, it, vi } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { useDom0Swtpm } from '../helpers/dom0-swtpm.js';
import { Domain } from '../../src/xen/index.js';
import { HC } from '../../src/xen/hypercall.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { responseCode as rc } from '../../src/tpm/wire.js';

const fx = useDom0Swtpm();
const { dir } = fx;


function serve(front: RingFront, domid: number): RingChannel {
  return new RingChannel(fx.dom0, { frontDomid: domid, refs: [...front.refs], port: front.port, target: { execute: (c) => fx.client.transmit(c), cancel: () => {} }, onFatal: () => {} });
}

describe('ring frontend pages across a new ring', () => {
  it('builds the next ring on the released frames without a hypercall for memory, zeroed', async () => {
    const g = await Domain.create({ domid: 31, dir });
    try {
      const first = new RingFront(g, 0, { pollUs: 0 });
      const ch = serve(first, g.domid);
      expect(rc(await first.transmit(tpm2.getRandom(32)))).toBe(0);
      const used = Buffer.from(first.sharedPage).some((b) => b !== 0);
      expect(used).toBe(true);
      ch.close(); // the backend unmaps (it saw us Closed)
      await first.close();
      expect(await first.released).toBe(true);
      const calls = vi.spyOn(g.hc, 'call');
      const second = new RingFront(g, 0, { pollUs: 0 });
      const ops = calls.mock.calls.map((c) => c[0]);
      calls.mockRestore();
      expect(ops).not.toContain(HC.populate);
      // The same frames, zeroed but for the ring header the new front wrote (sring.init()).
      const page = Buffer.from(second.sharedPage);
      expect(page.subarray(64).every((b) => b === 0)).toBe(true);
      const ch2 = serve(second, g.domid);
      expect(rc(await second.transmit(tpm2.getRandom(8)))).toBe(0);
      ch2.close();
      await second.close();
    } finally {
      await g.destroy();
    }
  });

  it('gives frames the backend still maps back to the hypervisor; the next ring takes the spare run, never those frames', async () => {
    const g = await Domain.create({ domid: 32, dir });
    try {
      const first = new RingFront(g, 0, { pollUs: 0 });
      const ch = serve(first, g.domid);
      expect(rc(await first.transmit(tpm2.getRandom(8)))).toBe(0);
      const firstGfn = first.sharedPage.byteOffset / 4096;
      const calls = vi.spyOn(g.hc, 'call');
      await first.close(); // the backend keeps its mapping past every retry
      expect(await first.released).toBe(false);
      const back = calls.mock.calls.filter((c) => c[0] === HC.decrease_reservation).map((c) => c[1]);
      calls.mockClear();
      // The whole run (ring page and data pages) went back, from the ring page's frame on.
      expect(back).toEqual([[firstGfn, 33]]);
      ch.close();
      const second = new RingFront(g, 0, { pollUs: 0 });
      const ops = calls.mock.calls.map((c) => c[0]);
      calls.mockRestore();
      expect(ops).not.toContain(HC.populate);
      expect(second.sharedPage.byteOffset / 4096).not.toBe(firstGfn);
      await second.close();
    } finally {
      await g.destroy();
    }
  });

  it('backs a spare run once a ring is set up, so a ring built while the last one is still mapped (a resume) makes no populate hypercall', async () => {
    const g = await Domain.create({ domid: 33, dir });
    try {
      const first = new RingFront(g, 0, { pollUs: 0 });
      const ch = serve(first, g.domid);
      expect(rc(await first.transmit(tpm2.getRandom(8)))).toBe(0);
      await sleep(200); // idle: the spare is made now, off any path
      const calls = vi.spyOn(g.hc, 'call');
      // The backend still maps the first ring (it has not seen us Closed yet).
      const second = new RingFront(g, 0, { pollUs: 0 });
      const ops = calls.mock.calls.map((c) => c[0]);
      calls.mockRestore();
      expect(ops).not.toContain(HC.populate);
      const a = first.sharedPage.byteOffset / 4096;
      const b = second.sharedPage.byteOffset / 4096;
      expect(b >= a + 33 || b + 33 <= a).toBe(true);
      const ch2 = serve(second, g.domid);
      expect(rc(await second.transmit(tpm2.getRandom(8)))).toBe(0);
      ch.close();
      ch2.close();
      await first.close();
      await second.close();
    } finally {
      await g.destroy();
    }
  });

  it("sends its event channel's alloc_unbound before it sets up the ring's grants, and takes the port after", async () => {
    const g = await Domain.create({ domid: 34, dir });
    try {
      const start = vi.spyOn(g.hc, 'start');
      const grant = vi.spyOn(g.grants, 'grantAccess');
      const f = new RingFront(g, 0, { pollUs: 0 });
      expect(start.mock.calls.map((c) => c[0])).toEqual([HC.evtchn_alloc_unbound]);
      expect(start.mock.invocationCallOrder[0]!).toBeLessThan(grant.mock.invocationCallOrder[0]!);
      start.mockRestore();
      grant.mockRestore();
      const ch = serve(f, g.domid);
      expect(rc(await f.transmit(tpm2.getRandom(8)))).toBe(0);
      ch.close();
      await f.close();
    } finally {
      await g.destroy();
    }
  });
});
