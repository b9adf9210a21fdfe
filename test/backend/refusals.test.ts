// A frontend that floods its ring with malformed requests gets every one answered EINVAL and counted in
// vtpm_requests_refused_total, but only REFUSAL_BURST log lines per interval (plus the count of the
// rest), so a guest cannot flood dom0's log (docs/observability.md).
import { afterAll, beforeAll, expect, it } from 'vitest';
import { setTimeout as sleep } from 'node:timers/promises';
import { freshXenDir } from '../helpers/child.js';
import { Domain } from '../../src/xen/index.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import { RING_SLOT } from '../../src/xen/tpmif.js';
import { backendMetrics, registry } from '../../src/util/metrics.js';
import { removeDir } from '../helpers/temp.js';
import { REFUSAL_BURST } from '../../src/util/rate-limit.js';

const dir = freshXenDir();
let dom0: Domain;

beforeAll(async () => {
  dom0 = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await dom0.destroy();
  removeDir(dir);
});

async function refusedSegments(): Promise<number> {
  backendMetrics();
  const text = await registry.metrics();
  const m = /^vtpm_requests_refused_total\{reason="segments"\} (\d+)$/m.exec(text);
  return m ? Number(m[1]) : 0;
}

it('160 malformed ring requests: 160 EINVAL answers and counts, REFUSAL_BURST log lines and one count line', async () => {
  const g = await Domain.create({ domid: 61, dir });
  const front = new RingFront(g, 0);
  const lines: string[] = [];
  const fatal: string[] = [];
  const ch = new RingChannel(dom0, {
    frontDomid: g.domid,
    refs: [...front.refs],
    port: front.port,
    target: { execute: () => Promise.reject(new Error('a malformed request must never run')), cancel: () => {} },
    onFatal: (r) => fatal.push(r),
    log: (l) => lines.push(l),
  });
  const before = await refusedSegments();
  const ringPage = g.frames(0);
  const v = new DataView(ringPage.buffer, ringPage.byteOffset, 4096);
  const prod = new Uint32Array(ringPage.buffer, ringPage.byteOffset, 4);
  let reqProd = 0;
  for (let round = 0; round < 10; round++) {
    // 16 requests with nr_segments = 0 (ids 1000+), then one notification, as a buggy guest would.
    for (let i = 0; i < 16; i++) {
      const slot = 64 + (reqProd % 32) * RING_SLOT;
      ringPage.fill(0, slot, slot + RING_SLOT); // op COMMAND, locality 0 (the slot held a response)
      v.setBigUint64(slot, BigInt(1000 + reqProd), true);
      v.setUint8(slot + 10, 0);
      v.setUint32(slot + 12, 12, true);
      reqProd++;
    }
    Atomics.store(prod, 0, reqProd);
    g.evtchn.send(front.port);
    for (let i = 0; i < 200 && Atomics.load(prod, 2) !== reqProd; i++) await sleep(5);
    expect(Atomics.load(prod, 2)).toBe(reqProd); // rsp_prod: every request answered
  }
  // The last response slot: id 1159, status EINVAL (1), length 0.
  const last = 64 + ((reqProd - 1) % 32) * RING_SLOT;
  expect(v.getBigUint64(last, true)).toBe(1159n);
  expect(v.getUint32(last + 8, true)).toBe(1);
  expect(await refusedSegments()).toBe(before + 160);
  expect(fatal).toEqual([]);
  const first = Array.from({ length: REFUSAL_BURST }, (_, i) => `dom61: request ${1000 + i}: nr_segments 0 is not 1..12`);
  expect(REFUSAL_BURST).toBe(5);
  expect(lines).toEqual(first);
  ch.close();
  // Closing the channel writes what was held back.
  expect(lines).toEqual([...first, 'dom61: 155 more refusals in 10 s (not logged one by one)']);
  await front.close();
  await g.destroy();
});
