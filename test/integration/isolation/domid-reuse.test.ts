// A domid used again after its domain died (every resume does this: a new guest process, a new domain,
// the same domid): the backend's late unmap of the dead domain's grant must not touch the new domain's
// entry of the same ref. It used to unpin it, wrapping its pin count, so every later map of that ref
// failed with GNTST_general_error and a resumed guest was cut off.
import { afterAll, beforeAll, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../../helpers/child.js';
import { Domain, domainExists } from '../../../src/xen/index.js';
import { removeDir } from '../../helpers/temp.js';

const dir = freshXenDir();
let dom0: Domain;

beforeAll(async () => {
  dom0 = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await dom0.destroy();
  removeDir(dir);
});

it("a late unmap of a dead domain's grant leaves the same ref of its successor (same domid) mappable", async () => {
  const old = await Domain.create({ domid: 31, dir });
  const ref = old.grants.grantAccess(0, old.allocFrames(1));
  const stale = dom0.mapper.map(31, ref);
  // The guest process dies while dom0 still has its page mapped (a suspend, a kill -9).
  await old.destroy();
  for (let i = 0; i < 100 && (await domainExists(dir, 31)); i++) await sleep(10);
  const next = await Domain.create({ domid: 31, dir });
  try {
    const gfn = next.allocFrames(1);
    expect(next.grants.grantAccess(0, gfn)).toBe(ref);
    stale.unmap();
    const m = dom0.mapper.map(31, ref);
    new Uint8Array(m.buffer)[0] = 0x5a;
    expect(next.frames(gfn)[0]).toBe(0x5a);
    m.unmap();
  } finally {
    await next.destroy();
  }
});
