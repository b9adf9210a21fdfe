// The hypervisor process against a domain that sends it garbage: random hypercalls with random
// arguments, more objects than its budget, and a flood of requests it never reads the replies of. The
// hypervisor stays up, the offender alone is cut off, and another guest's commands keep completing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../helpers/child.js';
import { Domain, HC, domainExists } from '../../src/xen/index.js';
import { closeFd } from '../../native/unix-rights.js';
import { MAX_OBJECTS_PER_DOMAIN } from '../../src/xen/hv-domain.js';
import { V2Channel } from '../../src/backend/v2-channel.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import type { VtpmTarget } from '../../src/tpm/vtpm.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { removeDir } from '../helpers/temp.js';

const ENOMEM = 12;
const dir = freshXenDir();
let dom0: Domain;
let good: Domain;
let front: V2Front;
let ch: V2Channel;
const GET_RANDOM_8 = tpm2.getRandom(8);

const echo: VtpmTarget = {
  async execute(): Promise<Uint8Array> {
    return new Uint8Array([0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]);
  },
  cancel(): void {},
};

async function goodStillServed(n = 20): Promise<void> {
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    expect((await front.transmit(GET_RANDOM_8)).length).toBe(10);
    expect(performance.now() - t0).toBeLessThan(2000);
  }
}

beforeAll(async () => {
  dom0 = await Domain.create({ domid: 0, dir });
  good = await Domain.create({ domid: 32, dir });
  front = new V2Front(good, 0);
  ch = new V2Channel(dom0, { frontDomid: 32, refs: [...front.refs], port: front.port, target: echo, onFatal: () => {} });
});
afterAll(async () => {
  ch.close();
  await front.close();
  await good.destroy();
  await dom0.destroy();
  removeDir(dir);
});

describe('hypervisor against a hostile domain', () => {
  it('answers 5000 random hypercalls without harm to anyone else', async () => {
    const bad = await Domain.create({ domid: 31, dir });
    try {
      for (let i = 0; i < 5000; i++) {
        const r = randomBytes(32);
        const op = r[0]! % 12;
        // Small arguments half the time, so the calls reach the checks past the range tests.
        const args = [1, 2, 3, 4, 5, 6, 7].map((k) => (r[k]! & 1 ? r.readUInt32LE(k * 3) : r[k + 8]! % 40));
        const rep = bad.hc.tryCall(op, args);
        for (const fd of rep.fds) closeFd(fd);
      }
      expect(await domainExists(dir, 31)).toBe(true);
      await goodStillServed();
      // good's grant and channel to dom0 are as they were.
      expect(dom0.evtchn.status(ch.port)).toMatchObject({ state: 2, remoteDom: 32, remotePort: front.port });
    } finally {
      await bad.destroy();
    }
  });

  it(`holds at most ${MAX_OBJECTS_PER_DOMAIN} descriptors for one domain: past that, ENOMEM for it alone`, async () => {
    const bad = await Domain.create({ domid: 33, dir, geometry: { nrPages: 4096, evtchnPages: 4 } });
    try {
      let status = 0;
      let held = 0;
      for (let gfn = 0; gfn < 4096 && status === 0; gfn += 8) {
        const rep = bad.hc.tryCall(HC.populate, [gfn, 8]);
        status = rep.status;
        held += rep.status === 0 ? 8 : 0;
        for (const fd of rep.fds) closeFd(fd);
      }
      expect(status).toBe(-ENOMEM);
      expect(held).toBeLessThanOrEqual(MAX_OBJECTS_PER_DOMAIN);
      expect(bad.hc.tryCall(HC.evtchn_alloc_unbound, [0]).status).toBe(-ENOMEM);
      await goodStillServed();
      // Another domain still gets memory and channels.
      const other = await Domain.create({ domid: 34, dir });
      other.allocFrames(4);
      other.evtchn.allocUnbound(0);
      await other.destroy();
    } finally {
      await bad.destroy();
    }
  });

  it(`lets dom0, the toolstack's domain, hold what its geometry needs beyond ${MAX_OBJECTS_PER_DOMAIN} (multi-VM mode grants 33 frames per vTPM domain)`, async () => {
    const own = freshXenDir();
    const big = await Domain.create({ domid: 0, dir: own, geometry: { nrPages: 4096, evtchnPages: 1 } });
    try {
      let held = 0;
      for (let gfn = 0; gfn < MAX_OBJECTS_PER_DOMAIN + 200; gfn += 8) {
        const rep = big.hc.tryCall(HC.populate, [gfn, 8]);
        expect(rep.status, `populate at gfn ${gfn}`).toBe(0);
        held += 8;
        for (const fd of rep.fds) closeFd(fd);
      }
      expect(held).toBeGreaterThan(MAX_OBJECTS_PER_DOMAIN);
    } finally {
      await big.destroy();
      removeDir(own);
    }
  });

  it('cuts off a domain that floods requests without reading the replies', async () => {
    const bad = await Domain.create({ domid: 35, dir });
    const req = Buffer.alloc(32 * 512);
    for (let i = 0; i < 512; i++) req.writeUInt32LE(HC.evtchn_status, 32 * i);
    let cut = false;
    for (let i = 0; i < 20_000 && !cut; i++) {
      try {
        fs.writeSync(bad.hc.fd, req);
      } catch {
        cut = true; // EPIPE / ECONNRESET: the hypervisor hung up
      }
      if (i % 64 === 63) {
        await sleep(1);
        cut ||= !(await domainExists(dir, 35));
      }
    }
    expect(cut).toBe(true);
    for (let i = 0; i < 100 && (await domainExists(dir, 35)); i++) await sleep(10);
    expect(await domainExists(dir, 35)).toBe(false);
    await goodStillServed();
    bad.hc.close();
  });
});
