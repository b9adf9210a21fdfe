// The five fuzz targets of `npm run fuzz` (docs/fuzzing.md), each a raw hostile peer of one live
// daemon: a guest's xs_wire connection (xenstored), a client FIFO pair (manager), a control socket
// (the backend's QEMU endpoint), and guest domains writing v2 pages and ring slots (backend). Each
// counts the inputs it sent and the times its daemon cut it off, and starts over after a cut-off.
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Domain, SharedRing } from '../../src/xen/index.js';
import { RING_SLOT, TPMIF_STATE_SUBMIT, V2_LENGTH, V2_LOCALITY, V2_NR_EXTRA, V2_STATE, XS_FEATURE_RING } from '../../src/xen/tpmif.js';
import { XsClient, type XsWatch } from '../../src/xenstore/client.js';
import { XsReceiver, XsType } from '../../src/xenstore/wire.js';
import { switchState, vtpmDevice, type VtpmDevice, waitForState, watchState, XenbusState } from '../../src/xenstore/xenbus.js';
import { frontendConnect } from '../../src/xenstore/xenbus-frontend.js';
import { removeDeviceDirectories, writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { ManagerClient } from '../../src/manager/client.js';
import { RENDEZVOUS, TransportError, writeShared } from '../../src/manager/fifo.js';
import { connectPair, type ClientPair } from '../../src/manager/fifo-client.js';
import { Rng, ctrlMessage, managerFrame, tpmCommand, xsFrame } from './gen.js';

export interface TargetStats {
  inputs: number;
  /** Times the daemon cut this peer off (closed its connection, dropped its FIFO pair, closed its device). */
  cutOffs: number;
  /** Inputs that got no answer and no cut-off in time (the peer gave up and started over). */
  unanswered: number;
  /** Ring batches that named the ring page itself as a data page: the answer overwrote the indices. */
  ownRingOverwritten: number;
  /** Times the peer could not attach again after a cut-off (the rest of that batch is skipped). */
  attachFailures: number;
}

export interface Target {
  readonly name: string;
  readonly stats: TargetStats;
  /** Send `n` inputs, each answered, refused or followed by a cut-off before the next batch. */
  batch(n: number): Promise<void>;
  close(): Promise<void>;
}

function newStats(): TargetStats {
  return { inputs: 0, cutOffs: 0, unanswered: 0, ownRingOverwritten: 0, attachFailures: 0 };
}

/** Poll until `done()` or `ms` passed; whether it became true. */
async function until(done: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (!done()) {
    if (Date.now() > end) return false;
    await sleep(1);
  }
  return true;
}

// ---- xs_wire ------------------------------------------------------------------------------------

/** A raw xs_wire client on a guest's domain socket: pipelined generated frames, up to 16 at a time. */
export class XsTarget implements Target {
  readonly name = 'xs_wire';
  readonly stats = newStats();
  #sock: net.Socket | null = null;
  #replies = 0;
  #closed = true;
  #txIds: number[] = [];

  constructor(
    private readonly socketPath: string,
    private readonly domid: number,
    private readonly r: Rng,
  ) {}

  async #open(): Promise<void> {
    const s = net.createConnection(this.socketPath);
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    s.on('error', () => {});
    const rx = new XsReceiver((m) => {
      if (m.type === XsType.WATCH_EVENT) return;
      this.#replies++;
      if (m.type === XsType.TRANSACTION_START) {
        const id = Number(m.payload.toString('latin1').replace(/\0$/, ''));
        if (Number.isInteger(id) && id > 0) this.#txIds.push(id);
        if (this.#txIds.length > 16) this.#txIds.shift();
      }
    });
    s.on('data', (d: Buffer) => {
      try {
        rx.push(d);
      } catch {
        s.destroy();
      }
    });
    s.on('close', () => (this.#closed = true));
    this.#sock = s;
    this.#closed = false;
    this.#replies = 0;
  }

  async batch(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.#closed) await this.#open();
      const k = Math.min(left, 1 + this.r.int(16));
      const before = this.#replies;
      for (let i = 0; i < k; i++) this.#sock!.write(xsFrame(this.r, this.domid, this.#txIds));
      this.stats.inputs += k;
      left -= k;
      // Each frame gets one reply, unless the connection is cut off (a framing violation) first.
      const answered = await until(() => this.#closed || this.#replies - before >= k, 3000);
      if (this.#closed) this.stats.cutOffs++;
      else if (!answered) {
        // A frame whose declared length ran past what we sent keeps the daemon waiting: start over.
        this.stats.unanswered += k - (this.#replies - before);
        this.#sock!.destroy();
        this.#closed = true;
      }
      if (this.#closed) this.#txIds = [];
    }
  }

  async close(): Promise<void> {
    this.#sock?.destroy();
  }
}

// ---- swtpm control channel ----------------------------------------------------------------------

/** A raw control-socket client of a QEMU endpoint: one generated message, then its answer or hang-up. */
export class CtrlTarget implements Target {
  readonly name = 'swtpm ctrl';
  readonly stats = newStats();
  #sock: net.Socket | null = null;
  #got = 0;
  #closed = true;

  constructor(
    private readonly ctrlPath: string,
    private readonly r: Rng,
  ) {}

  async #open(): Promise<void> {
    const s = net.createConnection(this.ctrlPath);
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    s.on('error', () => {});
    s.on('data', (d: Buffer) => (this.#got += d.length));
    s.on('close', () => (this.#closed = true));
    this.#sock = s;
    this.#closed = false;
  }

  async batch(n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      if (this.#closed) await this.#open();
      const before = this.#got;
      this.#sock!.write(ctrlMessage(this.r));
      this.stats.inputs++;
      // An answer, or a hang-up (fatal errors, and an incomplete message after swtpm's 500 ms).
      const answered = await until(() => this.#closed || this.#got > before, 2000);
      if (this.#closed) this.stats.cutOffs++;
      else if (!answered) {
        this.stats.unanswered++;
        this.#sock!.destroy();
        this.#closed = true;
      }
      // the rest of a multi-part answer (GET_STATEBLOB) arrives meanwhile; nothing parses it
    }
  }

  async close(): Promise<void> {
    this.#sock?.destroy();
  }
}

// ---- manager client FIFOs -----------------------------------------------------------------------

/**
 * Raw frames on a private client FIFO pair bound to the fuzzer's own vTPM instance, and one input in
 * ten a frame on the shared rendezvous FIFO (now and then only a frame's first bytes, as a writer that
 * dies mid-frame leaves them).
 */
export class ManagerTarget implements Target {
  readonly name = 'manager frames';
  readonly stats = newStats();
  /** Frames written to the rendezvous FIFO (counted in `stats.inputs` too). */
  rendezvousFrames = 0;
  lastError = '';
  #pair: ClientPair | null = null;
  #answers = 0;
  #closed = true;
  #serial = 0;
  #instance = -1;

  constructor(
    private readonly runDir: string,
    private readonly vm: string,
    private readonly r: Rng,
  ) {}

  async #open(): Promise<void> {
    if (this.#instance < 0) {
      const mc = await ManagerClient.connect(this.runDir, { name: `fuzz-open-${process.pid}` });
      this.#instance = (await mc.open({ vmUuid: this.vm, version: '2.0' })).instance;
      mc.disconnect();
    }
    this.#pair?.reader.close();
    this.#pair?.writer.destroy();
    const pair = await connectPair(this.runDir, { name: `fuzz-${process.pid}-${++this.#serial}`, bind: this.#instance, timeoutMs: 5000 });
    pair.reader.on('frame', () => this.#answers++);
    pair.reader.on('error', () => {});
    pair.reader.on('end', () => (this.#closed = true));
    pair.writer.on('error', () => (this.#closed = true));
    pair.writer.on('close', () => (this.#closed = true));
    this.#pair = pair;
    this.#closed = false;
  }

  async batch(n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      if (this.#closed) {
        try {
          await this.#open();
        } catch (err) {
          // A manager that no longer attaches clients (the liveness check reports it too).
          this.stats.attachFailures++;
          this.lastError = (err as Error).message;
          return;
        }
      }
      if (this.r.chance(0.1)) {
        // Nobody answers on the rendezvous but the client a CONNECT names: nothing to wait for.
        const f = managerFrame(this.r, this.#instance);
        if (this.r.chance(0.8)) f.writeUInt32BE(0x100, 10); // CONNECT with hostile parameters
        const half = this.r.chance(0.05);
        try {
          writeShared(path.join(this.runDir, RENDEZVOUS), half ? f.subarray(0, 1 + this.r.int(f.length - 1)) : f);
        } catch (err) {
          if (!(err instanceof TransportError)) throw err;
        }
        this.stats.inputs++;
        this.rendezvousFrames++;
        continue;
      }
      const before = this.#answers;
      this.#pair!.writer.write(managerFrame(this.r, this.#instance));
      this.stats.inputs++;
      const answered = await until(() => this.#closed || this.#answers > before, 3000);
      if (this.#closed) this.stats.cutOffs++;
      else if (!answered) {
        this.stats.unanswered++;
        this.#closed = true;
      }
    }
  }

  async close(): Promise<void> {
    this.#pair?.reader.close();
    this.#pair?.writer.destroy();
    for (const f of this.#pair?.files ?? []) await import('node:fs').then((fs) => fs.rmSync(f, { force: true }));
  }
}

// ---- guest domains: v2 page and ring slots ------------------------------------------------------

const PAGE = 4096;
const RING_DATA_PAGES = 4;

/**
 * A guest domain that publishes a vTPM device and then writes generated bytes straight into its
 * granted page (v2) or ring slots and data pages (ring), notifying the backend after each input. It
 * never goes through the frontend library: its grants stay valid across reconnects.
 */
export class GuestTarget implements Target {
  readonly name: string;
  readonly stats = newStats();
  #pageGfn = -1;
  #pageRef = -1;
  /** Pages of earlier connections, freed once the backend has let go of them. */
  readonly #retired: Array<{ gfn: number; ref: number }> = [];
  readonly #dataRefs: number[] = [];
  readonly #dataGfn: number;
  #port = -1;
  #dev: VtpmDevice;
  #watch: XsWatch | null = null;
  #closed = true;
  /** A new device id for each connection: the old device's teardown never races the new one's setup. */
  #devid = 0;

  private constructor(
    private readonly dom: Domain,
    private readonly xs: XsClient,
    private readonly dom0: XsClient,
    private readonly protocol: 'v2' | 'ring',
    private readonly vm: string,
    private readonly r: Rng,
  ) {
    this.name = protocol === 'v2' ? 'v2 page' : 'ring slots';
    this.#dev = vtpmDevice(dom.domid, 0, 0);
    this.#dataGfn = dom.allocFrames(RING_DATA_PAGES);
    for (let i = 0; i < RING_DATA_PAGES; i++) this.#dataRefs.push(dom.grants.grantAccess(0, this.#dataGfn + i));
  }

  static async create(o: { xenDir: string; domainSocketDir: string; dom0: XsClient; domid: number; protocol: 'v2' | 'ring'; vm: string; r: Rng }): Promise<GuestTarget> {
    await o.dom0.introduce(o.domid);
    const dom = await Domain.create({ domid: o.domid, dir: o.xenDir });
    const xs = await XsClient.connect(path.join(o.domainSocketDir, `dom${o.domid}.sock`));
    return new GuestTarget(dom, xs, o.dom0, o.protocol, o.vm, o.r);
  }

  get #page(): Uint8Array {
    return this.dom.frames(this.#pageGfn);
  }

  /** The toolstack's device add, then our side of the handshake, to Connected (a refusal counts as a cut-off). */
  async #connect(): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#connectOnce();
      } catch (err) {
        if (attempt >= 3) throw err;
        this.stats.cutOffs++;
      }
    }
  }

  async #connectOnce(): Promise<void> {
    const watch = this.#watch;
    this.#watch = null;
    await watch?.close().catch(() => {});
    if (this.#pageGfn >= 0) {
      // The old device goes as libxl removes one: the frontend closes, online=0, the backend reaches
      // Closed, then the directories go. (The new device serves the same VM's vTPM: it must not
      // start while the old one still holds it.)
      await switchState(this.xs, this.#dev.frontend, XenbusState.Closed).catch(() => {});
      await this.dom0.write(`${this.#dev.backend}/online`, '0').catch(() => {});
      await waitForState(this.dom0, this.#dev.backend, (st) => st === XenbusState.Closed || st === XenbusState.Unknown, { timeoutMs: 5000 }).catch(() => {});
    }
    await removeDeviceDirectories(this.dom0, this.#dev).catch(() => {});
    // A fresh ring page for each device: the backend of the last one may still be letting go of its.
    if (this.#pageGfn >= 0) this.#retired.push({ gfn: this.#pageGfn, ref: this.#pageRef });
    for (let i = this.#retired.length - 1; i >= 0; i--) {
      const p = this.#retired[i]!;
      if (this.dom.grants.endAccess(p.ref)) {
        this.dom.freeFrames(p.gfn);
        this.#retired.splice(i, 1);
      }
    }
    this.#pageGfn = this.dom.allocFrames(1);
    this.#pageRef = this.dom.grants.grantAccess(0, this.#pageGfn);
    this.#dev = await writeDeviceDirectories(this.dom0, { frontDomid: this.dom.domid, backDomid: 0, devid: this.#devid++, uuid: this.vm });
    if (this.protocol === 'ring') new SharedRing(this.#page.buffer as ArrayBuffer, RING_SLOT, this.#page.byteOffset, PAGE).init();
    if (this.#port >= 0) {
      this.dom.evtchn.off(this.#port);
      this.dom.evtchn.close(this.#port);
    }
    this.#port = this.dom.evtchn.allocUnbound(0);
    this.dom.evtchn.on(this.#port, () => {}); // answers are polled from the page
    this.#closed = false;
    const dev = this.#dev;
    this.#watch = await watchState(this.xs, dev.backend, (s) => {
      if (dev === this.#dev && (s === XenbusState.Closing || s === XenbusState.Closed)) this.#closed = true;
    });
    await frontendConnect(
      this.xs,
      this.#dev,
      { ringRef: this.#pageRef, eventChannel: this.#port, extra: this.protocol === 'ring' ? { [XS_FEATURE_RING]: '1' } : {} },
      { timeoutMs: 10_000, requireBackendFeature: this.protocol === 'ring' ? XS_FEATURE_RING : undefined },
    );
  }

  async batch(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.#closed) await this.#connect();
      left -= this.protocol === 'v2' ? await this.#v2Input() : await this.#ringInputs(Math.min(left, 1 + this.r.int(8)));
    }
  }

  /** One v2 request: header fields mostly sane, the command random; then SUBMIT and notify. */
  async #v2Input(): Promise<number> {
    const r = this.r;
    const page = this.#page;
    const dv = new DataView(page.buffer, page.byteOffset, PAGE);
    const cmd = tpmCommand(r, 4088);
    page.set(cmd, 8);
    dv.setUint32(V2_LENGTH, r.chance(0.97) ? cmd.length : r.chance(0.5) ? 4089 + r.int(8192) : r.u32(), true);
    page[V2_LOCALITY] = r.chance(0.97) ? r.int(5) : r.int(256);
    page[V2_NR_EXTRA] = r.chance(0.98) ? 0 : r.int(256);
    const submit = r.chance(0.95);
    Atomics.store(page, V2_STATE, submit ? TPMIF_STATE_SUBMIT : r.int(256));
    this.dom.evtchn.send(this.#port);
    this.stats.inputs++;
    // SUBMIT is answered with FINISH (or the device is cut off); any other state is not a request.
    const done = await until(() => this.#closed || Atomics.load(page, V2_STATE) !== TPMIF_STATE_SUBMIT, submit ? 10_000 : 20);
    if (this.#closed) this.stats.cutOffs++;
    else if (!done && submit) {
      this.stats.unanswered++;
      this.#closed = true;
    }
    return 1;
  }

  /** `k` ring requests (slot fields mostly sane, grants ours or not, commands random) and one notify. */
  async #ringInputs(k: number): Promise<number> {
    const r = this.r;
    const page = this.#page;
    const dv = new DataView(page.buffer, page.byteOffset, PAGE);
    const size = 32;
    const reqProd = dv.getUint32(0, true);
    let namedRing = false;
    for (let i = 0; i < k; i++) {
      const off = 64 + ((reqProd + i) % size) * RING_SLOT;
      const seg = r.int(RING_DATA_PAGES);
      const cmd = tpmCommand(r, PAGE);
      this.dom.frames(this.#dataGfn + seg).set(cmd);
      dv.setBigUint64(off, BigInt(r.u32()) * 0x100000000n + BigInt(r.u32()), true);
      dv.setUint8(off + 8, r.chance(0.9) ? 0 : r.chance(0.5) ? r.int(3) : r.int(256));
      dv.setUint8(off + 9, r.chance(0.9) ? 0 : r.int(256));
      const nr = r.chance(0.9) ? 1 : r.int(256);
      dv.setUint8(off + 10, nr);
      dv.setUint8(off + 11, 0);
      dv.setUint32(off + 12, r.chance(0.9) ? cmd.length : r.chance(0.5) ? r.int(PAGE * 13) : r.u32(), true);
      for (let g = 0; g < 12; g++) {
        const ours = g === 0 ? this.#dataRefs[seg]! : this.#dataRefs[r.int(RING_DATA_PAGES)]!;
        const ref = r.chance(0.92) ? ours : r.pick([this.#pageRef, r.int(64), r.u32()]);
        dv.setUint32(off + 16 + 4 * g, ref, true);
        if (ref === this.#pageRef && g < nr) namedRing = true;
      }
    }
    // An index attack now and then: claim far more requests than the ring holds (must cut us off).
    const lie = r.chance(0.01);
    Atomics.store(new Uint32Array(page.buffer, page.byteOffset, 4), 0, lie ? (reqProd + size + 1 + r.int(1 << 20)) >>> 0 : (reqProd + k) >>> 0);
    dv.setUint32(12, (reqProd + k) >>> 0, true); // rsp_event: notify us when all are answered
    this.dom.evtchn.send(this.#port);
    this.stats.inputs += k;
    const want = (reqProd + k) >>> 0;
    const done = await until(() => this.#closed || dv.getUint32(8, true) === want, namedRing ? 1000 : 10_000);
    if (this.#closed) this.stats.cutOffs++;
    else if (!done) {
      // A request that named our ring page as its data page had its answer written over the indices:
      // our own doing, not a hang (the backend answered into the page it was given).
      if (namedRing) this.stats.ownRingOverwritten++;
      else this.stats.unanswered += k;
      this.#closed = true;
    }
    return k;
  }

  async close(): Promise<void> {
    await this.#watch?.close().catch(() => {});
    await removeDeviceDirectories(this.dom0, this.#dev).catch(() => {});
    await this.xs.close().catch(() => {});
    // the backend may still hold our pages mapped for a moment: give it time to let go
    await sleep(200);
    await this.dom.destroy().catch(() => {});
  }
}
