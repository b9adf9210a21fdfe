// The two guest↔backend transports end to end over the emulated hypervisor, with a real swtpm process
// answering the TPM commands: bytes on the v2 page, ordering on the ring, cancel, hostile frontends.
import { describe, expect, it } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { useDom0Swtpm } from '../helpers/dom0-swtpm.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { responseCode as rc } from '../../src/tpm/wire.js';
import { SwtpmProcess } from '../helpers/swtpm.js';
import { TpmClient } from '../helpers/tpm-client.js';
import { Domain } from '../../src/xen/index.js';
import { V2Channel } from '../../src/backend/v2-channel.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import type { VtpmTarget } from '../../src/tpm/vtpm.js';
import { FrontendError } from '../../src/tpmif/transport.js';
import { TPMIF_STATE_FINISH, TPMIF_STATE_IDLE, TPMIF_STATE_CANCEL, RING_SLOT } from '../../src/xen/tpmif.js';

const fx = useDom0Swtpm();
const { dir } = fx;
let nextDomid = 10;

/** The swtpm, as a target; `hold` lets a test keep a command "running" until released. */
function target(): VtpmTarget & { cancels: number; hold: Promise<void> | null } {
  const t = {
    cancels: 0,
    hold: null as Promise<void> | null,
    async execute(cmd: Uint8Array): Promise<Uint8Array> {
      if (t.hold) await t.hold;
      return fx.client.transmit(cmd);
    },
    cancel(): void {
      t.cancels++;
    },
  };
  return t;
}

async function guest(): Promise<Domain> {
  return Domain.create({ domid: nextDomid++, dir });
}

describe('tpmif v2 shared page', () => {
  it('carries a command and its response with the byte layout of xen-tpmfront', async () => {
    const g = await guest();
    const front = new V2Front(g, 0);
    const fatal: string[] = [];
    const ch = new V2Channel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: target(), onFatal: (r) => fatal.push(r) });
    const page = g.frames(0); // the first frame the frontend allocated is its shared page
    const rsp = await front.transmit(tpm2.getRandom(16), { locality: 2 });
    expect(rc(rsp)).toBe(0);
    expect(rsp.length).toBe(10 + 2 + 16);
    // length u32 LE @0, state @4 = FINISH (2), locality @5, pad @6, nr_extra_pages @7, data @8.
    expect(Buffer.from(page.subarray(0, 8)).toString('hex')).toBe('1c000000' + '02' + '02' + '00' + '00');
    expect(Buffer.from(page.subarray(8, 18)).toString('hex')).toBe('80010000001c00000000');
    expect(page[4]).toBe(TPMIF_STATE_FINISH);
    expect(fatal).toEqual([]);
    ch.close();
    await front.close();
    await g.destroy();
  });

  it('works the same with busy-polling off at both ends (VTPM_POLL_US=0) and with long windows', async () => {
    for (const pollUs of [0, 2000]) {
      const g = await guest();
      const front = new V2Front(g, 0, { pollUs });
      const ch = new V2Channel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: target(), onFatal: () => {}, pollUs });
      for (let i = 0; i < 50; i++) expect(rc(await front.transmit(tpm2.getRandom(8)))).toBe(0);
      // Both ends leave the port unmasked whenever they sleep: a notification still wakes them.
      await sleep(5);
      expect(fx.dom0.evtchn.status(ch.port).masked).toBe(false);
      ch.close();
      await front.close();
      await g.destroy();
    }
  });

  it('answers CANCEL on an idle device with IDLE', async () => {
    const g = await guest();
    const front = new V2Front(g, 0);
    const ch = new V2Channel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: target(), onFatal: () => {} });
    const page = g.frames(0);
    page[4] = TPMIF_STATE_CANCEL;
    g.evtchn.send(front.port);
    for (let i = 0; i < 100 && page[4] !== TPMIF_STATE_IDLE; i++) await sleep(5);
    expect(page[4]).toBe(TPMIF_STATE_IDLE);
    ch.close();
    await front.close();
    await g.destroy();
  });

  it('passes a cancel of a running command to the vTPM, and the command still finishes', async () => {
    const g = await guest();
    const front = new V2Front(g, 0);
    const t = target();
    let release!: () => void;
    t.hold = new Promise((r) => (release = r));
    const ch = new V2Channel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: t, onFatal: () => {} });
    const p = front.transmit(tpm2.getRandom(8));
    await sleep(20);
    front.cancel();
    await sleep(20);
    expect(t.cancels).toBe(1);
    release();
    expect(rc(await p)).toBe(0);
    ch.close();
    await front.close();
    await g.destroy();
  });

  it('cuts off a frontend that submits a length past the page, naming it', async () => {
    const g = await guest();
    const front = new V2Front(g, 0);
    const fatal: string[] = [];
    const ch = new V2Channel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: target(), onFatal: (r) => fatal.push(r) });
    const page = g.frames(0);
    new DataView(page.buffer, page.byteOffset).setUint32(0, 5000, true);
    Atomics.store(page, 4, 1);
    g.evtchn.send(front.port);
    for (let i = 0; i < 100 && !fatal.length; i++) await sleep(5);
    expect(fatal).toEqual(['v2 request length 5000 exceeds 4088 bytes']);
    // The backend let go of the page: the guest can take its grant back.
    expect(g.grants.endAccess(front.refs[0]!)).toBe(true);
    void ch;
    await g.destroy();
  });
});

describe('multi-request ring', () => {
  async function pair(segments = 1): Promise<{ g: Domain; front: RingFront; ch: RingChannel; fatal: string[]; t: ReturnType<typeof target> }> {
    const g = await guest();
    const front = new RingFront(g, 0, { segments });
    const fatal: string[] = [];
    const t = target();
    const ch = new RingChannel(fx.dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: t, onFatal: (r) => fatal.push(r) });
    return { g, front, ch, fatal, t };
  }

  it('runs 300 pipelined PCR extends in order: the PCR equals the SHA-256 model', async () => {
    const { g, front, ch } = await pair();
    let model = Buffer.from(tpm2.parsePcrRead(await front.transmit(tpm2.pcrReadSha256(16))));
    const all: Promise<Uint8Array>[] = [];
    for (let i = 0; i < 300; i++) {
      const d = randomBytes(32);
      model = createHash('sha256').update(model).update(d).digest();
      all.push(front.transmit(tpm2.pcrExtendSha256(16, d)));
    }
    expect((await Promise.all(all)).map(rc).every((c) => c === 0)).toBe(true);
    expect(Buffer.from(tpm2.parsePcrRead(await front.transmit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(model.toString('hex'));
    ch.close();
    await front.close();
    await g.destroy();
  });

  it('answers a malformed request with EINVAL and keeps serving the ring', async () => {
    const { g, front, ch, fatal } = await pair();
    // Forge a request with nr_segments = 0 in the next slot, as a buggy guest would.
    const ringPage = g.frames(0);
    const v = new DataView(ringPage.buffer, ringPage.byteOffset, 4096);
    const slot = 64 + 0 * RING_SLOT;
    v.setBigUint64(slot, 777n, true);
    v.setUint8(slot + 10, 0);
    v.setUint32(slot + 12, 12, true);
    Atomics.store(new Uint32Array(ringPage.buffer, ringPage.byteOffset, 1), 0, 1);
    g.evtchn.send(front.port);
    await sleep(30);
    // The response slot says: id 777, status EINVAL (1), length 0.
    expect(Buffer.from(ringPage.subarray(slot, slot + 16)).toString('hex')).toBe('0903000000000000' + '01000000' + '00000000');
    expect(fatal).toEqual([]);
    ch.close();
    await g.destroy();
    void front;
  });

  it('cancels a queued command before it runs: TPM_RC_CANCELED, status CANCELED', async () => {
    const { g, front, ch, t } = await pair();
    let release!: () => void;
    t.hold = new Promise((r) => (release = r));
    const first = front.transmit(tpm2.getRandom(8));
    const second = front.transmit(tpm2.getRandom(8));
    await sleep(20);
    front.cancel(front.nextId - 1n); // the second one, still queued
    await sleep(20);
    release();
    expect(rc(await first)).toBe(0);
    expect(Buffer.from(await second).toString('hex')).toBe('80010000000a00000909');
    ch.close();
    await front.close();
    await g.destroy();
  });

  it('carries commands larger than a page in several granted pages', async () => {
    // Its own swtpm: an oversize command desynchronises swtpm's byte stream for later commands.
    const own = await SwtpmProcess.onSockets();
    const ownClient = await TpmClient.connect({ path: own.dataPath! });
    const g = await guest();
    const front = new RingFront(g, 0, { segments: 3 });
    const ch = new RingChannel(fx.dom0, {
      frontDomid: g.domid,
      refs: [...front.refs],
      port: front.port,
      target: { execute: (c) => ownClient.transmit(c), cancel: () => {} },
      onFatal: () => {},
    });
    // 9000 bytes: larger than swtpm's buffer, so the TPM answers TPM_RC_COMMAND_SIZE — but the ring
    // delivered all of it (a truncated command would get a different error).
    const big = Buffer.alloc(9000);
    big.writeUInt16BE(0x8001, 0);
    big.writeUInt32BE(9000, 2);
    big.writeUInt32BE(0x17b, 6);
    const rsp = await front.transmit(big);
    expect(rsp.length).toBe(10);
    expect(rc(rsp) & 0xfff).toBe(0x142 & 0xfff);
    ch.close();
    await front.close();
    await g.destroy();
    ownClient.close();
    await own.stop();
  });

  it('cuts off a frontend whose req_prod runs past the ring, while another keeps working', async () => {
    const bad = await pair();
    const good = await pair();
    const ringPage = bad.g.frames(0);
    Atomics.store(new Uint32Array(ringPage.buffer, ringPage.byteOffset, 1), 0, 5000);
    bad.g.evtchn.send(bad.front.port);
    for (let i = 0; i < 100 && !bad.fatal.length; i++) await sleep(5);
    expect(bad.fatal[0]).toMatch(/^bogus ring requests: req_prod 5000 is 5000 past rsp_prod_pvt 0 \(ring size 32\)$/);
    expect(rc(await good.front.transmit(tpm2.getRandom(4)))).toBe(0);
    good.ch.close();
    await good.front.close();
    await good.g.destroy();
    await bad.g.destroy();
  });

  it('refuses an oversize command locally with E2BIG, sending nothing', async () => {
    const { g, front, ch } = await pair(1);
    await expect(front.transmit(new Uint8Array(5000))).rejects.toThrow(FrontendError);
    expect(ch.commands).toBe(0);
    ch.close();
    await front.close();
    await g.destroy();
  });
});
