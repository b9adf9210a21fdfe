// The backend role of our multi-request transport (src/xen/tpmif.ts `ring`): a ring.h ring of TPM
// requests whose command and response bytes live in granted data pages. Requests run in order, one at
// a time on the guest's vTPM; a queued request can be cancelled before it runs, a running one through
// the TPM. A request that is merely wrong gets an EINVAL response; a ring that lies about its indices
// cuts the frontend off, and so does one that keeps more data pages mapped at once than MAX_MAPPED_PAGES.
// A data-page mapping is pinned while any queued or running request holds a view of it; only unpinned
// ones are evicted from the cache. With an exactly-once target, the requests outstanding together run as one
// group under a single checkpoint (group commit), and none of their answers is published before it.
//
// After answering everything it had, the channel may watch the ring for the guest's next request for a
// short, adaptive window (src/xen/poll.ts), its port masked, as the v2 channel does; it gives way as soon
// as another guest's port is pending, and a request it finds runs without a turn of the loop between. A
// guest waiting for the very CPU the watch holds gets it: the watch ends and we sleep (SpinPeer, src/xen/poll.ts).
import { BackRing, GrantError, PollWindow, RingError, SharedRing, StandAside, spinUntil, type Domain, type GrantMapping } from '../xen/index.js';
import {
  RING_MAX_SEGMENTS,
  RING_OP_CANCEL,
  RING_OP_COMMAND,
  RING_OP_SUSPEND,
  RING_SLOT,
  RING_STATUS_CANCELED,
  RING_STATUS_EINVAL,
  RING_STATUS_EIO,
  RING_STATUS_OK,
  decodeRingRequestAt,
  encodeRingResponse,
  type RingRequest,
} from '../xen/tpmif.js';
import { canceledCode, canceledResponse, failureResponse } from '../tpm/error-response.js';
import { responseCode } from '../tpm/wire.js';
import type { Channel, ChannelOptions } from './channel.js';
import type { OnceRequest } from '../tpm/vtpm.js';
import { RingEvent } from './capture.js';
import { LogRateLimiter } from '../util/rate-limit.js';
import { metricsSink } from '../util/metrics-sink.js';

const PAGE = 4096;
const MAX_LOCALITY = 4;
/** Unpinned data-page mappings kept per frontend (the frontend reuses its grants, like blkif's). */
const MAX_CACHED_MAPPINGS = 256;
/**
 * Data pages one frontend may have mapped at once, pinned or cached (4 MiB). A one-page ring holds 32
 * requests of at most 12 pages, 384 pins; a frontend that needs more is cut off, never evicted under.
 */
export const MAX_MAPPED_PAGES = 1024;
/** Longest a channel serves requests its watch found in one turn of the event loop (ms), as the echo backend. */
const MAX_TURN_MS = 2;

/**
 * Channels of this process with requests queued or running. A channel polls for its guest's next
 * request only while no other channel has work: the poll holds up the whole loop, including the
 * manager's answers other guests' checkpoints wait for, which no event-channel port announces.
 */
let busyChannels = 0;

interface Job {
  req: RingRequest;
  command: Uint8Array | null;
  pages: Uint8Array[];
  /** The grefs whose cached mappings this job pins (one pin per segment) until it is answered. */
  pinned: number[];
}

interface DataMapping {
  map: GrantMapping;
  /** One view of the page for every job that pins it (made once, not per segment). */
  view: Uint8Array;
  /** Queued or running jobs' segments viewing this page: never unmapped while above zero. */
  pins: number;
}

export class MappingLimitError extends Error {
  readonly code = 'EMAPLIMIT';
  constructor(message: string) {
    super(message);
    this.name = 'MappingLimitError';
  }
}

export class RingChannel implements Channel {
  readonly protocol = 'ring' as const;
  readonly frontDomid: number;
  readonly #dom: Domain;
  readonly #ringMap: GrantMapping;
  readonly #ring: BackRing;
  /** Private copies of the slots taken in one look, decoded through one DataView (no copy per request). */
  readonly #slots: Uint8Array;
  readonly #slotView: DataView;
  readonly #port: number;
  readonly #opts: ChannelOptions;
  /** gref -> mapping, least recently used first (a use moves it to the end). */
  readonly #data = new Map<number, DataMapping>();
  readonly #queue: Job[] = [];
  /** The requests taken off the queue and not answered yet (one, or a group under one checkpoint). */
  #running: Job[] = [];
  #pump: Promise<void> | null = null;
  #closed = false;
  readonly #poll: PollWindow;
  /** When this turn of the event loop started serving us (performance.now()). */
  #turnAt = 0;
  commands = 0;
  /** Requests found by the poll after an answer, before any notification. */
  polled = 0;
  /** Requests answered from the exactly-once table instead of running. */
  replayed = 0;
  /** Waits that stood aside (slept at once) because the other end waited for our CPU. */
  get stoodAside(): number {
    return this.#peer.stoodAside;
  }
  readonly #peer = new StandAside(() => this.#dom.evtchn.sharesCpu(this.#port));
  /** A frontend sending bad requests by the thousand gets one log line per interval, with a count. */
  readonly #refusals = new LogRateLimiter((l) => this.#opts.log?.(l));

  constructor(dom: Domain, opts: ChannelOptions) {
    if (opts.refs.length < 1 || opts.refs.length > 16) throw new Error(`ring takes 1..16 ring pages, got ${opts.refs.length}`);
    this.#dom = dom;
    this.#opts = opts;
    this.frontDomid = opts.frontDomid;
    this.#poll = new PollWindow(opts.pollUs, opts.pollContended);
    this.#ringMap = dom.mapper.mapMany(opts.frontDomid, opts.refs);
    this.#ring = new BackRing(new SharedRing(this.#ringMap.buffer, RING_SLOT));
    this.#slots = new Uint8Array(this.#ring.size * RING_SLOT);
    this.#slotView = new DataView(this.#slots.buffer);
    try {
      this.#port = dom.evtchn.bindInterdomain(opts.frontDomid, opts.port);
    } catch (err) {
      this.#ringMap.unmap();
      throw err;
    }
    dom.evtchn.on(this.#port, () => this.#onEvent());
  }

  /** Our local event-channel port bound to the frontend's. */
  get port(): number {
    return this.#port;
  }

  notifyConnected(): void {
    if (this.#closed) return;
    this.#dom.evtchn.send(this.#port);
    this.#opts.tap?.(RingEvent.NOTIFY_OUT);
  }

  #onEvent(): void {
    if (this.#closed) return;
    this.#opts.tap?.(RingEvent.NOTIFY_IN);
    this.#turnAt = performance.now();
    this.#take();
  }

  /** Take every request on the ring (after a notification, or found by the poll). */
  #take(): void {
    if (this.#closed) return;
    this.#poll.arrived();
    try {
      do {
        // Every slot taken is copied before any is decoded; #accept never takes slots itself.
        for (let n = this.#ring.takeRequestsInto(this.#slots), i = 0; i < n; i++) {
          this.#accept(decodeRingRequestAt(this.#slotView, i * RING_SLOT));
          if (this.#closed) return;
        }
      } while (this.#ring.finalCheckForRequests());
    } catch (err) {
      if (err instanceof RingError) return this.#fatal(err.message, 'ring_indices');
      throw err;
    }
    this.#kick();
  }

  /** Validate the private copy; queue it, answer it at once, or act on a cancel. */
  #accept(req: RingRequest): void {
    this.#opts.tap?.(RingEvent.REQUEST, req.locality, req.nrSegments, req.length, req.id);
    if (req.op === RING_OP_CANCEL) {
      this.#cancel(req.cancelId);
      this.#respond(req.id, RING_STATUS_OK, null, []);
      return;
    }
    if (req.op === RING_OP_SUSPEND) {
      const onSuspend = this.#opts.onSuspend;
      if (!onSuspend) return this.#respond(req.id, RING_STATUS_EINVAL, null, []);
      // Everything accepted before the notice is answered first (the hook's quiesce drains it).
      onSuspend().then(
        () => this.#respond(req.id, RING_STATUS_OK, null, []),
        (err: unknown) => {
          this.#opts.log?.(`dom${this.frontDomid}: suspend notice: ${(err as Error).message}`);
          this.#respond(req.id, RING_STATUS_EIO, null, []);
        },
      );
      return;
    }
    const bad = this.#validate(req);
    if (bad) {
      this.#refuse(req.id, bad[0], bad[1]);
      return;
    }
    const pages: Uint8Array[] = [];
    const pinned: number[] = [];
    try {
      for (const g of req.grefs) {
        pages.push(this.#pinData(g));
        pinned.push(g);
      }
    } catch (err) {
      this.#unpinData(pinned);
      if (err instanceof MappingLimitError) return this.#fatal(err.message, 'mapping_limit');
      if (!(err instanceof GrantError)) throw err;
      this.#refuse(req.id, 'grant', err.message);
      return;
    }
    // Exactly-once: a request resubmitted after resume (or a backend restart) whose id already
    // completed gets its stored answer; nothing runs a second time.
    const done = this.#opts.target.completed?.(req.id);
    if (done) {
      this.replayed++;
      this.#respond(req.id, done.status, done.response, pages);
      this.#unpinData(pinned);
      return;
    }
    this.#queue.push({ req, command: null, pages, pinned });
  }

  /** What is wrong with a request, as [metric reason, log text], or null. */
  #validate(req: RingRequest): [string, string] | null {
    if (req.op !== RING_OP_COMMAND) return ['op', `unknown op ${req.op}`];
    if (req.locality > MAX_LOCALITY) return ['locality', `locality ${req.locality} is not 0..4`];
    if (req.nrSegments < 1 || req.nrSegments > RING_MAX_SEGMENTS) return ['segments', `nr_segments ${req.nrSegments} is not 1..${RING_MAX_SEGMENTS}`];
    if (req.length < 10 || req.length > req.nrSegments * PAGE) {
      return ['length', `length ${req.length} does not fit 10..${req.nrSegments * PAGE} (${req.nrSegments} pages)`];
    }
    return null;
  }

  /** Answer EINVAL without running: counted, and logged at most once per interval for this frontend. */
  #refuse(id: bigint, reason: string, text: string): void {
    metricsSink()?.backendMetrics().refused.inc({ reason });
    this.#refusals.line(`dom${this.frontDomid}`, `dom${this.frontDomid}: request ${id}: ${text}`);
    this.#respond(id, RING_STATUS_EINVAL, null, []);
  }

  /** A view of data page `gref`, mapped (or taken from the cache) and pinned for one job segment. */
  #pinData(gref: number): Uint8Array {
    let d = this.#data.get(gref);
    if (d) {
      this.#data.delete(gref);
    } else {
      this.#evictUnpinned(MAX_CACHED_MAPPINGS - 1);
      if (this.#data.size >= MAX_MAPPED_PAGES) {
        throw new MappingLimitError(`keeps more than ${MAX_MAPPED_PAGES} data pages mapped at once (ref ${gref} refused)`);
      }
      const map = this.#dom.mapper.map(this.frontDomid, gref);
      d = { map, view: new Uint8Array(map.buffer), pins: 0 };
    }
    this.#data.set(gref, d);
    d.pins++;
    return d.view;
  }

  #unpinData(grefs: readonly number[]): void {
    for (const g of grefs) {
      const d = this.#data.get(g);
      if (d && d.pins > 0) d.pins--;
    }
  }

  /** Unmap least recently used unpinned mappings until at most `keep` unpinned ones remain. */
  #evictUnpinned(keep: number): void {
    let unpinned = 0;
    for (const d of this.#data.values()) if (d.pins === 0) unpinned++;
    for (const [g, d] of this.#data) {
      if (unpinned <= keep) return;
      if (d.pins > 0) continue;
      d.map.unmap();
      this.#data.delete(g);
      unpinned--;
    }
  }

  #cancel(id: bigint): void {
    const i = this.#queue.findIndex((j) => j.req.id === id);
    if (i >= 0) {
      const [job] = this.#queue.splice(i, 1);
      const command = gather(job!.pages, job!.req.length);
      this.#respond(id, RING_STATUS_CANCELED, canceledResponse(command), job!.pages);
      this.#unpinData(job!.pinned);
      return;
    }
    if (this.#running.some((j) => j.req.id === id)) this.#opts.target.cancel();
  }

  #kick(): void {
    if (this.#pump || this.#closed) return;
    busyChannels++;
    this.#pump = this.#drainQueue().finally(() => {
      busyChannels--;
      this.#pump = null;
    });
  }

  async #drainQueue(): Promise<void> {
    while (!this.#closed && this.#queue.length > 0) {
      const job = this.#queue.shift()!;
      if (this.#opts.target.executeGroup) await this.#runGroup(job);
      else await this.#runOne(job);
    }
  }

  /** Before the last answer of a drained queue is pushed: the poll budget, the port masked if any. */
  #beforeLastAnswer(): number {
    const budget = this.#queue.length === 0 && !this.#closed && busyChannels === 1 ? this.#poll.budgetUs : 0;
    // Masked before the answer is visible, so the guest's next request cannot cost a wake-up mid-poll.
    if (budget > 0) this.#dom.evtchn.mask(this.#port);
    return budget;
  }

  /** After the last answer: watch for the next request (taken on a later turn), else sleep again. */
  #afterLastAnswer(budget: number): void {
    if (this.#closed || this.#queue.length > 0) return;
    this.#poll.answered();
    this.#peer.waited = false;
    if (budget <= 0) return this.#dom.evtchn.resting(this.#port);
    if (spinUntil(() => this.#ring.unconsumedRequests() > 0, budget, () => this.#dom.evtchn.otherPendingSome(this.#port), this.#peer)) {
      this.#dom.evtchn.consume(this.#port);
      this.polled++;
      this.#dom.evtchn.unmask(this.#port);
      // Queued now, the request runs as soon as this answer's group returns to the queue's loop; other
      // work of the process (IPC, the manager's socket) gets a turn at least every MAX_TURN_MS.
      if (performance.now() - this.#turnAt < MAX_TURN_MS) return this.#take();
      setImmediate(() => ((this.#turnAt = performance.now()), this.#take()));
      return;
    }
    // Nothing yet: sleep on the event channel again. unmask() delivers a request that raced this.
    this.#dom.evtchn.resting(this.#port, this.#peer.waited);
    this.#dom.evtchn.unmask(this.#port);
  }

  /** A target without group commit (multi-VM: the domain behind it does it): one request at a time, its id passed on. */
  async #runOne(job: Job): Promise<void> {
    this.#running = [job];
    // Copy the command out of guest memory once; the guest may rewrite its pages meanwhile.
    const command = gather(job.pages, job.req.length);
    let response: Uint8Array;
    let status: number;
    try {
      response = await this.#opts.target.execute(command, { locality: job.req.locality, id: job.req.id });
      status = statusOf(command, response);
    } catch (err) {
      this.#opts.log?.(`dom${this.frontDomid}: vTPM failed: ${(err as Error).message}`);
      response = failureResponse(command);
      status = RING_STATUS_EIO;
    }
    this.#running = [];
    this.commands++;
    const budget = this.#beforeLastAnswer();
    this.#finish(job, command, status, response);
    this.#afterLastAnswer(budget);
  }

  /**
   * Group commit: the head request and the queued ones the target lets join run in order, then one
   * checkpoint covers them all; only then are their answers published, in order.
   */
  async #runGroup(head: Job): Promise<void> {
    const group: Array<{ job: Job; command: Uint8Array }> = [{ job: head, command: gather(head.pages, head.req.length) }];
    this.#running = [head];
    const asRequest = (g: { job: Job; command: Uint8Array }): OnceRequest => ({ id: g.job.req.id, command: g.command, locality: g.job.req.locality });
    let responses: Uint8Array[] | null = null;
    try {
      responses = await this.#opts.target.executeGroup!(
        asRequest(group[0]!),
        (joins) => {
          const next = this.#queue[0];
          if (this.#closed || !next) return undefined;
          const command = gather(next.pages, next.req.length);
          if (!joins(command)) return undefined;
          this.#queue.shift();
          this.#running.push(next);
          group.push({ job: next, command });
          return asRequest(group[group.length - 1]!);
        },
        (r, response) => statusOf(r.command, response),
      );
    } catch (err) {
      this.#opts.log?.(`dom${this.frontDomid}: vTPM failed: ${(err as Error).message}`);
    }
    this.#running = [];
    this.commands += group.length;
    const budget = this.#beforeLastAnswer();
    // All answers go on the ring before one push (and at most one event).
    for (let i = 0; i < group.length; i++) {
      const { job, command } = group[i]!;
      const response = responses?.[i];
      const last = i === group.length - 1;
      if (response) this.#finish(job, command, statusOf(command, response), response, last);
      else this.#finish(job, command, RING_STATUS_EIO, failureResponse(command), last);
    }
    this.#afterLastAnswer(budget);
  }

  #finish(job: Job, command: Uint8Array, status: number, response: Uint8Array, push = true): void {
    if (this.#closed) return;
    if (response.length > job.pages.length * PAGE) {
      this.#opts.log?.(`dom${this.frontDomid}: response of ${response.length} bytes exceeds the request's ${job.pages.length} pages`);
      response = failureResponse(command);
      status = RING_STATUS_EIO;
    }
    this.#respond(job.req.id, status, response, job.pages, push);
    this.#unpinData(job.pinned);
  }

  #respond(id: bigint, status: number, response: Uint8Array | null, pages: Uint8Array[], push = true): void {
    if (this.#closed) return;
    if (response) scatter(pages, response);
    const r = this.#ring;
    encodeRingResponse(r.sring.view, r.nextResponseSlot(), { id, status, length: response?.length ?? 0 });
    r.produceResponse();
    this.#opts.tap?.(RingEvent.RESPONSE, status, 0, response?.length ?? 0, id);
    if (push && r.pushResponsesAndCheckNotify()) {
      this.#dom.evtchn.send(this.#port);
      this.#opts.tap?.(RingEvent.NOTIFY_OUT);
    }
  }

  #fatal(reason: string, kind: string): void {
    if (this.#closed) return;
    this.close();
    this.#opts.onFatal(reason, kind);
  }

  /** Resolves once every accepted request has been answered. */
  async drain(): Promise<void> {
    while (this.#pump) await this.#pump;
  }

  /** Data pages mapped now (pinned by requests or cached). */
  get mappedPages(): number {
    return this.#data.size;
  }

  /** Requests accepted but not yet answered (queued or running). */
  get outstanding(): number {
    return this.#queue.length + this.#running.length;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#refusals.flush();
    this.#queue.length = 0;
    // Posted, not waited for: nothing here needs the hypervisor's answers, and the next hypercall (a
    // resumed ring's map) reads them first. The frontend ends its grants once the unmaps have run.
    this.#dom.evtchn.close(this.#port, { wait: false });
    // Jobs still running hold views, but #closed keeps them from ever writing through them again.
    for (const d of this.#data.values()) d.map.unmap({ wait: false });
    this.#data.clear();
    this.#ringMap.unmap({ wait: false });
  }
}

/** Ring status of a response: a TPM_RC_CANCELED (or 1.2's) answer is reported as canceled. */
function statusOf(command: Uint8Array, response: Uint8Array): number {
  return response.length === 10 && responseCode(response) === canceledCode(command) ? RING_STATUS_CANCELED : RING_STATUS_OK;
}

function gather(pages: Uint8Array[], length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0, off = 0; off < length; i++, off += PAGE) out.set(pages[i]!.subarray(0, Math.min(PAGE, length - off)), off);
  return out;
}

function scatter(pages: Uint8Array[], data: Uint8Array): void {
  for (let i = 0, off = 0; off < data.length; i++, off += PAGE) pages[i]!.set(data.subarray(off, Math.min(off + PAGE, data.length)));
}
