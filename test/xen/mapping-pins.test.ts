// Data-page mappings of the ring transport are pinned while a request holds a view of them: a guest
// that names hundreds of refs (one frame granted under all of them) and then a ref it never granted
// gets EINVAL for that one request, every queued answer lands in its own page, and another guest
// served meanwhile never sees a byte of it. A guest that wants more pages mapped at once than the
// bound is cut off alone.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../helpers/child.js';
import { Domain, FrontRing, SharedRing } from '../../src/xen/index.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { MAX_MAPPED_PAGES, RingChannel } from '../../src/backend/ring-channel.js';
import {
  REQ_GREFS,
  REQ_ID,
  REQ_LENGTH,
  REQ_LOCALITY,
  REQ_NR_SEGMENTS,
  REQ_OP,
  RING_MAX_SEGMENTS,
  RING_OP_COMMAND,
  RING_SLOT,
  RING_STATUS_EINVAL,
  RING_STATUS_OK,
  RSP_ID,
  RSP_STATUS,
} from '../../src/xen/tpmif.js';
import type { VtpmTarget } from '../../src/tpm/vtpm.js';
import { removeDir } from '../helpers/temp.js';

const PAGE = 4096;
const dir = freshXenDir();
let dom0: Domain;
let nextDomid = 40;

beforeAll(async () => {
  dom0 = await Domain.create({ domid: 0, dir, geometry: { evtchnPages: 2 } });
});
afterAll(async () => {
  await dom0.destroy();
  removeDir(dir);
});

/** A vTPM stand-in that answers each command with "RESPONSE-OF-dom<N>" once `release` is called. */
function heldTarget(domid: number): VtpmTarget & { release: () => void; ran: number } {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const t = {
    ran: 0,
    release: () => release(),
    async execute(): Promise<Uint8Array> {
      await gate;
      t.ran++;
      return new TextEncoder().encode(`RESPONSE-OF-dom${domid}`.padEnd(32, '.'));
    },
    cancel(): void {},
  };
  return t;
}

/**
 * A raw frontend that does not go through RingFront: its ring pages, one data frame granted under
 * `nrRefs` refs, and requests it writes slot by slot.
 */
async function rawGuest(ringPages: number, nrRefs: number, grantFrames = 1) {
  const g = await Domain.create({ domid: nextDomid++, dir, geometry: { grantFrames } });
  const ringGfn = g.allocFrames(ringPages);
  const ringMem = g.frames(ringGfn, ringPages);
  const sring = new SharedRing(ringMem.buffer as ArrayBuffer, RING_SLOT, ringMem.byteOffset, ringPages * PAGE);
  sring.init();
  const ring = new FrontRing(sring);
  const ringRefs = Array.from({ length: ringPages }, (_, i) => g.grants.grantAccess(0, ringGfn + i));
  const dataGfn = g.allocFrames(1);
  const data = g.frames(dataGfn);
  // TPM2_GetRandom(8), the command every request carries.
  data.set(tpm2.getRandom(8));
  const refs = Array.from({ length: nrRefs }, () => g.grants.grantAccess(0, dataGfn));
  const port = g.evtchn.allocUnbound(0);
  const submit = (id: number, grefs: readonly number[]): void => {
    const v = ring.sring.view;
    const off = ring.nextRequestSlot();
    v.setBigUint64(off + REQ_ID, BigInt(id), true);
    v.setUint8(off + REQ_OP, RING_OP_COMMAND);
    v.setUint8(off + REQ_LOCALITY, 0);
    v.setUint8(off + REQ_NR_SEGMENTS, grefs.length);
    v.setUint32(off + REQ_LENGTH, 12, true);
    for (let s = 0; s < RING_MAX_SEGMENTS; s++) v.setUint32(off + REQ_GREFS + 4 * s, grefs[s] ?? 0, true);
    ring.produceRequest();
  };
  const push = (): void => {
    ring.pushRequestsAndCheckNotify();
    g.evtchn.send(port);
  };
  const responses = (): Map<number, number> => {
    const out = new Map<number, number>();
    while (ring.unconsumedResponses() > 0) {
      const off = ring.responseSlot();
      out.set(Number(ring.sring.view.getBigUint64(off + RSP_ID, true)), ring.sring.view.getUint32(off + RSP_STATUS, true));
      ring.consumeResponse();
    }
    return out;
  };
  return { g, ring, ringRefs, refs, port, data, submit, push, responses };
}

async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await sleep(5);
  }
}

describe('ring data-page mappings', () => {
  it('keeps every page a queued request names mapped past 256 refs; an ungranted ref fails that request alone', async () => {
    const a = await rawGuest(1, 31 * RING_MAX_SEGMENTS);
    const b = await rawGuest(1, 4);
    const ta = heldTarget(a.g.domid);
    const tb = heldTarget(b.g.domid);
    const fatal: string[] = [];
    const cha = new RingChannel(dom0, { frontDomid: a.g.domid, refs: a.ringRefs, port: a.port, target: ta, onFatal: (r) => fatal.push(r) });
    const chb = new RingChannel(dom0, { frontDomid: b.g.domid, refs: b.ringRefs, port: b.port, target: tb, onFatal: (r) => fatal.push(r) });
    expect(a.ring.size).toBe(32);
    // 256 refs of one frame in 22 requests, all queued behind the first, held command ...
    for (let i = 0; i < 21; i++) a.submit(i + 1, a.refs.slice(i * RING_MAX_SEGMENTS, (i + 1) * RING_MAX_SEGMENTS));
    a.submit(22, a.refs.slice(252, 256));
    // ... then a ref the guest never granted: the mapping it tried must not cost a pinned one.
    a.submit(99, [500]);
    a.push();
    await until(() => cha.outstanding === 22 && a.ring.unconsumedResponses() === 1);
    expect([...a.responses()]).toEqual([[99, RING_STATUS_EINVAL]]);
    // Guest b maps now (into any hole an eviction would have left) and is answered.
    b.submit(1, b.refs);
    b.push();
    await until(() => chb.outstanding === 1);
    tb.release();
    await until(() => b.ring.unconsumedResponses() === 1);
    expect([...b.responses()]).toEqual([[1, RING_STATUS_OK]]);
    expect(new TextDecoder().decode(b.data.subarray(0, 32))).toBe(`RESPONSE-OF-dom${b.g.domid}`.padEnd(32, '.'));
    b.data.fill(0, 0, 32);
    // Past 256: 9 more requests, 372 refs in all.
    for (let i = 22; i < 31; i++) a.submit(i + 1, a.refs.slice(256 + (i - 22) * 12, 256 + (i - 21) * 12));
    a.push();
    await until(() => cha.outstanding === 31);
    // Now a's 31 answers are written, each through a page that is still mapped, none into b's.
    ta.release();
    await until(() => a.ring.unconsumedResponses() === 31);
    const got = a.responses();
    expect(got.size).toBe(31);
    for (let i = 1; i <= 31; i++) expect(got.get(i)).toBe(RING_STATUS_OK);
    expect(new TextDecoder().decode(a.data.subarray(0, 32))).toBe(`RESPONSE-OF-dom${a.g.domid}`.padEnd(32, '.'));
    expect([...b.data.subarray(0, 32)].every((x) => x === 0)).toBe(true);
    expect(fatal).toEqual([]);
    expect(cha.mappedPages).toBe(256 + 9 * RING_MAX_SEGMENTS);
    // Answered requests unpin; a cached page is used again without a new mapping.
    a.submit(100, [a.refs[0]!]);
    a.push();
    await until(() => a.ring.unconsumedResponses() === 1);
    expect(cha.mappedPages).toBe(256 + 9 * RING_MAX_SEGMENTS);
    cha.close();
    chb.close();
    await a.g.destroy();
    await b.g.destroy();
  });

  it(`cuts off a frontend that wants more than ${MAX_MAPPED_PAGES} pages mapped at once; another keeps working`, async () => {
    // Four ring pages hold 128 requests: 128 × 12 = 1536 segments, more than the bound.
    const a = await rawGuest(4, 1200, 4);
    const b = await rawGuest(1, 1);
    const ta = heldTarget(a.g.domid);
    const tb = heldTarget(b.g.domid);
    tb.release();
    const fatalA: string[] = [];
    const fatalB: string[] = [];
    const cha = new RingChannel(dom0, { frontDomid: a.g.domid, refs: a.ringRefs, port: a.port, target: ta, onFatal: (r) => fatalA.push(r) });
    const chb = new RingChannel(dom0, { frontDomid: b.g.domid, refs: b.ringRefs, port: b.port, target: tb, onFatal: (r) => fatalB.push(r) });
    expect(a.ring.size).toBe(128);
    for (let i = 0; i < 100; i++) a.submit(i + 1, a.refs.slice(i * RING_MAX_SEGMENTS, (i + 1) * RING_MAX_SEGMENTS));
    a.push();
    await until(() => fatalA.length > 0);
    expect(fatalA).toEqual([`keeps more than ${MAX_MAPPED_PAGES} data pages mapped at once (ref ${a.refs[MAX_MAPPED_PAGES]} refused)`]);
    // The cut-off channel released every mapping; the running command's answer goes nowhere.
    expect(cha.mappedPages).toBe(0);
    ta.release();
    b.submit(1, b.refs);
    b.push();
    await until(() => b.ring.unconsumedResponses() === 1);
    expect([...b.responses()]).toEqual([[1, RING_STATUS_OK]]);
    expect(fatalB).toEqual([]);
    chb.close();
    await a.g.destroy();
    await b.g.destroy();
  });
});
