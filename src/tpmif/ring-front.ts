// The frontend role of the multi-request ring (src/xen/tpmif.ts): a ring page plus one set of data
// pages per slot, all granted once at start (persistent grants, as blkif's feature-persistent) so a
// command costs no grant operations. Up to ring-size commands are outstanding; each names its data
// pages and gets its response back in them. It lives in tpmif/ (above xen/ only) because both ends
// use it: guests through TpmFront, and the multi-VM backend to reach each guest's vTPM domain.
//
// Waiting for an answer: a command sent while nothing else is outstanding is watched for on the ring
// (rsp_prod) for up to an adaptive poll window (src/xen/poll.ts), its port masked, as the v2 frontend
// watches its state byte: a backend that answers within microseconds then costs neither side a wake-up.
// A backend waiting for the very CPU the poll holds gets it: the poll ends and we sleep (SpinPeer, src/xen/poll.ts).
import { FrontRing, PollWindow, SharedRing, StandAside, ringSize, spinUntil, type Domain } from '../xen/index.js';
import {
  decodeRingResponse,
  encodeRingRequest,
  RING_MAX_SEGMENTS,
  RING_OP_CANCEL,
  RING_OP_COMMAND,
  RING_OP_SUSPEND,
  RING_SLOT,
  RING_STATUS_EINVAL,
  RING_STATUS_OK,
} from '../xen/tpmif.js';
import { FrontendError, type TpmTransport, type TransmitOptions } from './transport.js';
import { endAccessEventually } from './grants.js';

const PAGE = 4096;
/** How long after a ring is set up the frames for the next one are made ready (src/xen/domain.ts keepSpare). */
const SPARE_AFTER_MS = 50;

/**
 * Fronts of this process with commands outstanding. A lone command is polled for only while no other
 * front waits too: one that polls holds up every other front of the process (the multi-VM backend's
 * rings to its domains, many guests in one process), whose answers it does not look at.
 */
let waitingFronts = 0;

export interface RingFrontOptions {
  /** Data pages per request: the largest command and response is segments × 4096 bytes. */
  segments?: number;
  /** First request id (ids are never reused, so a resumed frontend continues from its last one). */
  firstId?: bigint;
  /** Poll window for a lone command's answer in µs (default VTPM_POLL_US or 50; 0: always sleep). */
  pollUs?: number;
  /** When polling stands down (default: CPU pressure, src/xen/poll.ts cpuContended). */
  contended?: () => boolean;
}

interface Pending {
  buffer: number;
  resolve: (r: Uint8Array) => void;
  reject: (e: Error) => void;
}

export class RingFront implements TpmTransport {
  readonly protocol = 'ring' as const;
  readonly refs: readonly number[];
  readonly port: number;
  readonly segments: number;
  readonly #dom: Domain;
  readonly #ring: FrontRing;
  readonly #ringGfn: number;
  readonly #dataGfn: number;
  /** The ring page and the data pages, one run of frames from #ringGfn. */
  readonly #frameCount: number;
  readonly #dataRefs: number[];
  /** Each buffer's grefs, as a request names them (sliced once, not per command). */
  readonly #bufferRefs: number[][] = [];
  readonly #free: number[] = [];
  readonly #pending = new Map<bigint, Pending>();
  readonly #waitingForSlot: Array<() => void> = [];
  #nextId: bigint;
  #closed = false;
  readonly #poll: PollWindow;
  /** The lone command being waited for (polled or not) and when it was sent, to learn the backend's pace. */
  #solo: { id: bigint; at: number } | null = null;
  /** Counted in waitingFronts. */
  #waiting = false;
  /** Our port is masked because we poll the ring (left masked after a poll that emptied it). */
  #masked = false;
  /** The suspend notice sent and not answered yet (announceSuspend). */
  #notice: { id: bigint; resolve: (ok: boolean) => void } | null = null;
  /** Answers taken from the ring by the poll, before any notification (for tests and studies). */
  polled = 0;
  /** Waits that stood aside (slept at once) because the other end waited for our CPU. */
  get stoodAside(): number {
    return this.#peer.stoodAside;
  }
  readonly #peer = new StandAside(() => this.#dom.evtchn.sharesCpu(this.port));
  /** After close: resolves once our grants are revoked and frames freed (false: the backend kept a mapping). */
  released: Promise<boolean> = Promise.resolve(false);
  /** The first event on our port: one before any request is the backend's word that it is Connected. */
  readonly notified: Promise<void>;

  constructor(dom: Domain, backDomid: number, opts: RingFrontOptions = {}) {
    this.#dom = dom;
    this.segments = opts.segments ?? 1;
    if (this.segments < 1 || this.segments > RING_MAX_SEGMENTS) throw new RangeError(`segments must be 1..${RING_MAX_SEGMENTS}`);
    this.#nextId = opts.firstId ?? 1n;
    this.#poll = new PollWindow(opts.pollUs, opts.contended);
    // The event channel's hypercall runs while the ring is set up in our own memory.
    const port = dom.evtchn.startAllocUnbound(backDomid);
    // The ring page and one buffer per slot in one run of frames (a cancel uses a slot but no buffer,
    // so buffers never run out before slots): one run is what the next ring reuses or keeps spare.
    const n = ringSize(PAGE, RING_SLOT);
    this.#frameCount = 1 + n * this.segments;
    this.#ringGfn = dom.allocFrames(this.#frameCount);
    this.#dataGfn = this.#ringGfn + 1;
    const page = dom.frames(this.#ringGfn);
    const sring = new SharedRing(page.buffer as ArrayBuffer, RING_SLOT, page.byteOffset, PAGE);
    sring.init();
    this.#ring = new FrontRing(sring);
    this.#dataRefs = [];
    for (let i = 0; i < n * this.segments; i++) this.#dataRefs.push(dom.grants.grantAccess(backDomid, this.#dataGfn + i));
    for (let b = 0; b < n; b++) {
      this.#free.push(b);
      this.#bufferRefs.push(this.#dataRefs.slice(b * this.segments, (b + 1) * this.segments));
    }
    this.refs = [dom.grants.grantAccess(backDomid, this.#ringGfn)];
    this.port = port();
    let notified!: () => void;
    this.notified = new Promise((r) => (notified = r));
    dom.evtchn.on(this.port, () => (notified(), this.#onResponses()));
    // Frames for the next ring (a resume builds one at once, while these may still be mapped by the
    // backend), backed while nothing waits: that ring then makes no populate hypercall on its path.
    setTimeout(() => {
      try {
        dom.keepSpare(this.#frameCount);
      } catch {
        // the hypervisor refused (memory, or the domain is going): the next ring populates, or says why
      }
    }, SPARE_AFTER_MS).unref();
  }

  get sharedPage(): Uint8Array {
    return this.#dom.frames(this.#ringGfn);
  }

  /** The id the next command will carry. */
  get nextId(): bigint {
    return this.#nextId;
  }

  get outstanding(): number {
    return this.#pending.size;
  }

  async transmit(command: Uint8Array, opts: TransmitOptions = {}): Promise<Uint8Array> {
    if (this.#closed) throw new FrontendError('ENODEV', 'frontend closed');
    const max = this.segments * PAGE;
    if (command.length > max) throw new FrontendError('E2BIG', `command of ${command.length} bytes exceeds ${max}`);
    while (this.#free.length === 0 || this.#ring.freeRequests() < 2) {
      // Keep one slot spare for a cancel.
      await new Promise<void>((r) => this.#waitingForSlot.push(r));
      if (this.#closed) throw new FrontendError('ENODEV', 'frontend closed');
    }
    const buffer = this.#free.pop()!;
    const data = this.#dom.frames(this.#dataGfn + buffer * this.segments, this.segments);
    data.set(command);
    // A resubmission after resume carries the id it had before, so the backend can answer it from
    // its exactly-once table; fresh ids continue above every id used.
    const id = opts.id ?? this.#nextId;
    if (id >= this.#nextId) this.#nextId = id + 1n;
    const grefs = this.#bufferRefs[buffer]!;
    const locality = opts.locality ?? 0;
    const request = { op: RING_OP_COMMAND, id, locality, length: command.length, grefs } as const;
    encodeRingRequest(this.#ring.sring.view, this.#ring.nextRequestSlot(), request);
    this.#ring.produceRequest();
    const p = new Promise<Uint8Array>((resolve, reject) => this.#pending.set(id, { buffer, resolve, reject }));
    this.#noteWaiting();
    const alone = this.#pending.size === 1 && waitingFronts === 1;
    const budget = alone ? this.#poll.budgetUs : 0;
    this.#solo = alone ? { id, at: performance.now() } : null;
    // Masked before the request is visible, so the backend's answer cannot cost a wake-up mid-poll.
    if (budget > 0) this.#mask();
    if (this.#ring.pushRequestsAndCheckNotify()) this.#dom.evtchn.send(this.port);
    // Gives way when another port of this domain is pending (the multi-VM backend's other guests).
    this.#peer.waited = false;
    if (budget > 0 && spinUntil(() => this.#ring.unconsumedResponses() > 0, budget, () => this.#dom.evtchn.otherPendingSome(this.port), this.#peer)) {
      this.#dom.evtchn.consume(this.port);
      this.polled++;
      this.#onResponses();
      // Nothing outstanding: stay masked until the next command (a late notification wakes nobody).
      if (this.#pending.size === 0) return p;
    }
    // Answers still to come arrive by notification: unmask delivers one that raced the spin.
    this.#dom.evtchn.resting(this.port, this.#peer.waited);
    this.#unmask();
    return p;
  }

  #mask(): void {
    if (this.#masked) return;
    this.#masked = true;
    this.#dom.evtchn.mask(this.port);
  }

  #unmask(): void {
    if (!this.#masked) return;
    this.#masked = false;
    this.#dom.evtchn.unmask(this.port);
  }

  /** Cancel one outstanding command (or, with no id, every one). */
  cancel(id?: bigint): void {
    if (this.#closed) return;
    const ids = id === undefined ? [...this.#pending.keys()] : [id];
    for (const target of ids) {
      if (!this.#pending.has(target) || this.#ring.full()) continue;
      this.#controlRequest(RING_OP_CANCEL, target);
    }
    if (this.#ring.pushRequestsAndCheckNotify()) this.#dom.evtchn.send(this.port);
  }

  /**
   * Tell the backend on the ring that a suspend's Closing follows (op 2): it answers what is
   * outstanding, makes the state durable, goes Closing and answers the notice. Resolves true once
   * that answer (status OK) is here: everything sent before it is answered and the vTPM's state is
   * durable, which a close may take as the backend's Closing without reading it from xenstore. False
   * when the backend refused the notice or the ring closed first.
   */
  announceSuspend(): Promise<boolean> {
    if (this.#closed || this.#ring.full()) return Promise.resolve(false);
    const id = this.#nextId;
    this.#controlRequest(RING_OP_SUSPEND, 0n);
    const acked = new Promise<boolean>((resolve) => (this.#notice = { id, resolve }));
    // A port left masked by the last poll would not deliver the answer.
    this.#unmask();
    if (this.#ring.pushRequestsAndCheckNotify()) this.#dom.evtchn.send(this.port);
    return acked;
  }

  /** Queue a request without segments (cancel, suspend notice); `arg` goes where the grefs would be. */
  #controlRequest(op: typeof RING_OP_CANCEL | typeof RING_OP_SUSPEND, arg: bigint): void {
    encodeRingRequest(this.#ring.sring.view, this.#ring.nextRequestSlot(), { op, id: this.#nextId++, arg });
    this.#ring.produceRequest();
  }

  #onResponses(): void {
    const r = this.#ring;
    const v = r.sring.view;
    do {
      const prod = r.sring.rspProd;
      if (r.responseProdOverflow(prod)) {
        // A backend claiming more responses than we asked for: stop trusting this ring.
        this.#failAll(new FrontendError('EPROTO', `backend rsp_prod ${prod} overruns the ring`));
        return;
      }
      while (r.rspCons !== prod) {
        const { id, status, length } = decodeRingResponse(v, r.responseSlot());
        r.consumeResponse();
        if (this.#notice?.id === id) {
          this.#notice.resolve(status === RING_STATUS_OK);
          this.#notice = null;
          continue;
        }
        const p = this.#pending.get(id);
        if (!p) continue; // a cancel's own acknowledgement, or a response to nothing we sent
        this.#pending.delete(id);
        if (this.#solo?.id === id) {
          this.#poll.record((performance.now() - this.#solo.at) * 1000);
          this.#solo = null;
        }
        const data = this.#dom.frames(this.#dataGfn + p.buffer * this.segments, this.segments);
        if (status === RING_STATUS_EINVAL) p.reject(new FrontendError('EINVAL', `backend refused request ${id}`));
        else p.resolve(data.slice(0, Math.min(length, data.length)));
        this.#free.push(p.buffer);
      }
    } while (r.finalCheckForResponses());
    this.#noteWaiting();
    // Taken: nothing here for the backend to wait on us for, until our next command says we run again.
    // (A front left marked runnable would make a backend on its CPU stop polling for nothing.)
    this.#dom.evtchn.resting(this.port);
    while (this.#waitingForSlot.length && this.#free.length && r.freeRequests() >= 2) this.#waitingForSlot.shift()!();
  }

  #noteWaiting(): void {
    const w = this.#pending.size > 0;
    if (w === this.#waiting) return;
    this.#waiting = w;
    waitingFronts += w ? 1 : -1;
  }

  #failAll(err: Error): void {
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    this.#noteWaiting();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    // Responses the backend published before it closed (it answers in-flight requests, then switches
    // state) are already in the ring even if their event has not arrived yet: take them first.
    this.#onResponses();
    this.#closed = true;
    this.#notice?.resolve(false);
    this.#notice = null;
    // An error (and its stack) only when someone is left to receive it.
    if (this.#pending.size) this.#failAll(new FrontendError('ENODEV', 'frontend closed'));
    for (const w of this.#waitingForSlot.splice(0)) w();
    // Posted: the suspend's Closed is answered without waiting for the hypervisor process to run.
    this.#dom.evtchn.close(this.port, { wait: false });
    // The backend unmaps our pages only once it sees us Closed, a moment after this. Like Linux's
    // gnttab_end_foreign_access, do not wait for it: revoke in the background (every few ms, up to 1 s)
    // and free the frames once nobody maps them; `released` says when.
    this.released = endAccessEventually(this.#dom, [...this.refs, ...this.#dataRefs], 200, 5).then((all) => {
      if (this.#dom.closed) return false;
      // Nobody maps them any more: kept backed for the next ring (a resume builds one at once).
      // A page the backend may still map goes back to the hypervisor instead.
      const free = all ? this.#dom.releaseFrames.bind(this.#dom) : this.#dom.freeFrames.bind(this.#dom);
      free(this.#ringGfn, this.#frameCount);
      return all;
    });
  }
}
