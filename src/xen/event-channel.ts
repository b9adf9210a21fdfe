// Event channels (docs/hypervisor.md, docs/protocols/event-channels.md): alloc_unbound /
// bind_interdomain / send / close with Xen's semantics. Routing (which port is bound to which) lives in the hypervisor process; each channel it
// hands out is a page holding the two ends' words (pending bit, mask bit) and a wake-up pipe towards
// each end, so a domain only ever touches channels it is an end of. A send sets the remote end's pending
// bit and, only on its 0→1 edge and only when that end is not masked, writes one byte to the peer's pipe.
// A process busy-polling its ring masks the port (EVTCHNOP_unmask's other half): peers then notify it
// for the price of one atomic OR instead of a wake-up write (2–3 µs of CPU, and the receiver's read
// and epoll wake-up on top). Setting up and closing a channel is a hypercall; sending never is.
import fs from 'node:fs';
import net from 'node:net';
import { mapShared, PAGE_SIZE, type Mapping } from '../../native/libc.js';
import { closeFd } from '../../native/unix-rights.js';
import { currentCpu } from '../../native/sched.js';
import type { Domain } from './domain.js';
import { ENOSPC, ESRCH, HC, type Reply } from './hypercall.js';
import { OTHER_PORTS_PER_LOOK, PollWindow, cpuContended, defaultPollUs } from './poll.js';

export const ECS_closed = 0;
export const ECS_unbound = 1;
export const ECS_interdomain = 2;

/** Bit 0 of an end's word: pending; bit 1: masked (Xen keeps them in two bitmaps; one word is enough). */
const PENDING = 1;
const MASKED = 2;
/** Byte offset of each end's word in a channel page (src/xen/hv-domain.ts CHANNEL_WORD_STRIDE). */
const WORD_STRIDE = 64;
/**
 * Each end's second word (4 bytes after its first), written by that end: where it runs, as a hint for
 * its peer's polls (Xen's analogue is the vCPU runstate area). Bits 0–15: the CPU it last ran on, plus
 * one (0: not said). Bit 16: runnable (running, polling, or woken by a send and not yet resting). The
 * peer may write anything here: a wrong value costs a poll its speed, never a message.
 */
const WHERE_OFFSET = 4;
const WHERE_CPU = 0xffff;
const WHERE_RUNNABLE = 0x10000;

/** One of our ports: its channel page (our word, the remote end's word) and its wake-up pipes. */
interface LocalPort {
  own: Int32Array;
  remote: Int32Array;
  /** Where we run, and where the remote end runs (WHERE_OFFSET). */
  ownWhere: Int32Array;
  remoteWhere: Int32Array;
  page: Mapping;
  /** Write end of the pipe that wakes the remote end. */
  tx: number;
  /** Read end of the pipe that wakes us. */
  sock: net.Socket;
}

export class EventChannelError extends Error {
  constructor(
    readonly code: 'EINVAL' | 'ESRCH' | 'ENOSPC',
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'EventChannelError';
  }
}

export interface PortStatus {
  state: number;
  remoteDom: number;
  remotePort: number;
  pending: boolean;
  masked: boolean;
}

type Handler = (port: number) => void;

/** Where every port's wake-up bytes are read to and dropped: a peer's flood drains 64 KiB per read, as a stream's reads did. */
const wakeScratch = Buffer.alloc(65536);

// Busy mode, the idea of Linux NAPI: a process that was just woken usually has more work coming (a
// backend serving many guests, a guest whose next answer follows). While busy, every handled port of
// the domain stays masked, so peers' sends cost them one atomic OR instead of a wake-up write (see
// above), and the process looks for pending ports itself once per turn of its event loop.
// A backend answering 256 guests otherwise spends almost half its time in those writes.
//  - Only a delivery starts it, not a send: a process that spins after each of its few sends (a suspend
//    cycle) takes the CPU xenstored needs. Figures: docs/benchmarks.md.
//  - It leaves, unmasking its ports, after a quiet window with nothing found (VTPM_POLL_US, default
//    50 µs) that adapts as the channels' spins do (poll.ts): it shuts while work comes in long gaps (a
//    multi-VM guest waiting on a chain of processes would take the CPU the chain needs), and is
//    zero while the CPUs are contended, when it leaves at the
//    first turn that finds nothing. A process with its ports masked gets no wake-ups, and a wake-up is
//    what lets the scheduler run a task ahead of a spinner: a preempted busy process would otherwise
//    wait out a time slice with work pending. Saturated, every turn finds work, so it holds either way.
//  - One poller per process serves every busy domain in it: one setImmediate per turn, not one each.
const busyDomains = new Set<EventChannels>();
let pollQueued = false;

function queuePoll(): void {
  if (pollQueued) return;
  pollQueued = true;
  setImmediate(pollTurn);
}

function pollTurn(): void {
  pollQueued = false;
  const now = performance.now();
  for (const ec of busyDomains) ec.pollTurn(now);
  if (busyDomains.size > 0) queuePoll();
}

/** A port busy mode and otherPending() look at: its own words and the remote end's where-word. */
type Watched = { port: number } & Pick<LocalPort, 'own' | 'ownWhere' | 'remoteWhere'>;

/**
 * Say in `ownWhere` that we run now, on `cpu` (+ 1), stored only when it changes (the peer reads that
 * cache line in its own spin); true if `remoteWhere` says the peer is runnable on that same CPU.
 */
function runsWith(ownWhere: Int32Array, remoteWhere: Int32Array, cpu = (currentCpu() + 1) & WHERE_CPU): boolean {
  if (Atomics.load(ownWhere, 0) !== (cpu | WHERE_RUNNABLE)) Atomics.store(ownWhere, 0, cpu | WHERE_RUNNABLE);
  const remote = Atomics.load(remoteWhere, 0);
  return cpu > 0 && (remote & WHERE_RUNNABLE) !== 0 && (remote & WHERE_CPU) === cpu;
}

export class EventChannels {
  readonly #dom: Domain;
  readonly #handlers = new Map<number, Handler>();
  readonly #ports = new Map<number, LocalPort>();
  /**
   * The open ports that have a handler, with their own words, as a plain array: busy mode's turns and
   * a poller's otherPending() look at every one of them, in a spin loop, and a backend has one per guest
   * (walking the two maps cost a spinning backend with 256 idle guests microseconds per look). Rebuilt
   * (never changed in place, so a walk survives a handler that opens or closes ports) when either map changes.
   */
  #watched: ReadonlyArray<Watched> | null = null;
  /** Where otherPendingSome() looks next in the watch list. */
  #cursor = 0;
  #dispatchQueued = false;
  /** Ports masked by their channel (polling its ring itself): neither wake-ups nor busy mode deliver them. */
  readonly #channelMasked = new Set<number>();
  /** Whether to cut the quiet window to nothing now (default: CPU pressure, poll.ts). */
  busyContended: (now: number) => boolean = cpuContended;
  #busyWindow = new PollWindow(defaultPollUs(), () => this.busyContended(performance.now()));
  /** The quiet window of the current quiet spell, in µs (-1: none started since the last work). */
  #quietUs = -1;
  #busy = false;
  #lastWorkAt = 0;
  readonly #wake = Buffer.from([1]);

  constructor(dom: Domain) {
    this.#dom = dom;
  }

  #watchList(): ReadonlyArray<Watched> {
    if (this.#watched) return this.#watched;
    const out: Watched[] = [];
    for (const port of this.#handlers.keys()) {
      const lp = this.#ports.get(port);
      if (lp) out.push({ port, own: lp.own, ownWhere: lp.ownWhere, remoteWhere: lp.remoteWhere });
    }
    return (this.#watched = out);
  }

  /** Take over the channel page and wake-up pipes the hypervisor handed us for `port` (end `end`). */
  #adopt(port: number, end: number, rep: Reply): void {
    const [pageFd, rxFd, txFd] = rep.fds as [number, number, number];
    let page: Mapping;
    try {
      page = mapShared(pageFd, 0, PAGE_SIZE, true);
    } catch (err) {
      closeFd(rxFd);
      closeFd(txFd);
      throw err;
    } finally {
      closeFd(pageFd);
    }
    // libuv reads the wake-up bytes straight into one shared scratch buffer and calls us: no stream
    // machinery, no 'data' event, no Buffer per wake-up. The bytes mean nothing; the pending bit does.
    // (Node's Socket constructor takes `onread` as connect() does; its typings list it for connect() only.)
    const opts: net.SocketConstructorOpts & { onread: net.OnReadOpts } = {
      fd: rxFd,
      readable: true,
      writable: false,
      onread: { buffer: wakeScratch, callback: () => (this.#deliver(port), true) },
    };
    const sock = new net.Socket(opts);
    // Channels must not keep a process alive on their own.
    sock.unref();
    const lp: LocalPort = {
      own: new Int32Array(page.buffer, WORD_STRIDE * end, 1),
      remote: new Int32Array(page.buffer, WORD_STRIDE * (1 - end), 1),
      ownWhere: new Int32Array(page.buffer, WORD_STRIDE * end + WHERE_OFFSET, 1),
      remoteWhere: new Int32Array(page.buffer, WORD_STRIDE * (1 - end) + WHERE_OFFSET, 1),
      page,
      tx: txFd,
      sock,
    };
    sock.on('error', () => sock.destroy());
    this.#ports.set(port, lp);
    this.#watched = null;
  }

  /** Clear the pending bit and run the port's handler, if it has one (else the bit stays set). */
  #deliver(port: number): void {
    const lp = this.#ports.get(port);
    const h = this.#handlers.get(port);
    if (!lp || !h) return;
    // A port its channel masked keeps its pending bit for unmask() (or the channel's poll) to find, as
    // in Xen; the masks of busy mode are ours, and we are looking.
    if (this.#channelMasked.has(port)) return;
    if ((Atomics.and(lp.own, 0, ~PENDING) & PENDING) === 0) return;
    runsWith(lp.ownWhere, lp.remoteWhere);
    const now = performance.now();
    // How long this work kept us waiting decides whether waiting busy for the next pays (poll.ts).
    this.#busyWindow.record((now - this.#lastWorkAt) * 1000);
    this.#lastWorkAt = now;
    this.#quietUs = -1;
    this.#enterBusy();
    h(port);
  }

  /** Upper bound of busy mode's quiet window in µs (0: never busy; every notification is a write). */
  get busyPollUs(): number {
    return this.#busyWindow.maxUs;
  }

  set busyPollUs(us: number) {
    this.#busyWindow = new PollWindow(us, () => this.busyContended(performance.now()));
  }

  #enterBusy(): void {
    if (this.#busy || this.busyPollUs <= 0) return;
    this.#busy = true;
    this.#lastWorkAt = performance.now();
    this.#quietUs = -1;
    for (const w of this.#watchList()) Atomics.or(w.own, 0, MASKED);
    busyDomains.add(this);
    queuePoll();
  }

  /** One turn of busy mode (called by the process's poller): deliver what is pending, or leave. */
  pollTurn(now: number): void {
    let found = false;
    for (const w of this.#watchList()) {
      if (Atomics.load(w.own, 0) & PENDING && !this.#channelMasked.has(w.port)) {
        this.#deliver(w.port);
        found = true;
      }
    }
    if (found || !this.#busy) return;
    if (this.#quietUs < 0) this.#quietUs = this.#busyWindow.budgetUs;
    // A peer runnable on our CPU cannot send what we wait for until we sleep: leave at once.
    if ((now - this.#lastWorkAt) * 1000 >= this.#quietUs || this.#peerWaitsForCpu()) this.#leaveBusy();
  }

  /** Say on every watched port that we run (and where); true if one's remote end waits for this CPU. */
  #peerWaitsForCpu(): boolean {
    const cpu = (currentCpu() + 1) & WHERE_CPU;
    let waits = false;
    for (const w of this.#watchList()) if (runsWith(w.ownWhere, w.remoteWhere, cpu)) waits = true;
    return waits;
  }

  /** Unmask the ports busy mode masked; one that became pending meanwhile is delivered (later turn). */
  #leaveBusy(): void {
    if (!this.#busy) return;
    this.#busy = false;
    busyDomains.delete(this);
    let pending = false;
    for (const w of this.#watchList()) {
      if (this.#channelMasked.has(w.port)) continue;
      Atomics.and(w.ownWhere, 0, ~WHERE_RUNNABLE);
      if (Atomics.and(w.own, 0, ~MASKED) & PENDING) pending = true;
    }
    if (pending) this.#scheduleDispatch();
  }

  /** Deliver every pending port that has a handler, on a later turn of the loop. */
  #scheduleDispatch(): void {
    if (this.#dispatchQueued) return;
    this.#dispatchQueued = true;
    setImmediate(() => {
      this.#dispatchQueued = false;
      for (const w of this.#watchList()) if (Atomics.load(w.own, 0) & PENDING) this.#deliver(w.port);
    });
  }

  /** The handler run (without data) whenever `port` becomes pending; replaces any earlier one. */
  on(port: number, handler: Handler): void {
    const lp = this.#port(port);
    this.#handlers.set(port, handler);
    this.#watched = null;
    if (this.#busy) Atomics.or(lp.own, 0, MASKED);
    if (Atomics.load(lp.own, 0) & PENDING) this.#scheduleDispatch();
  }

  /**
   * Mask `port` while this process polls the shared state behind it: sends still set the pending bit
   * but wake nobody. Pair with unmask() before waiting for a notification again.
   */
  mask(port: number): void {
    const lp = this.#port(port);
    this.#channelMasked.add(port);
    Atomics.or(lp.own, 0, MASKED);
  }

  /**
   * EVTCHNOP_unmask: clear the mask; a port that became pending meanwhile is delivered (later turn).
   * In busy mode the port stays masked in its word (peers need not wake us: we are looking anyway).
   */
  unmask(port: number): void {
    const lp = this.#port(port);
    this.#channelMasked.delete(port);
    const was = this.#busy && this.#handlers.has(port) ? Atomics.load(lp.own, 0) : Atomics.and(lp.own, 0, ~MASKED);
    if (was & PENDING) this.#scheduleDispatch();
  }

  /**
   * Clear `port`'s pending bit and say whether it was set: a poller that found its work in shared
   * memory consumes the notification that came with it, so unmask() does not deliver it again.
   */
  consume(port: number): boolean {
    const lp = this.#port(port);
    return (Atomics.and(lp.own, 0, ~PENDING) & PENDING) !== 0;
  }

  /**
   * Whether the remote end of `port` is runnable on the CPU we run on now (so it cannot run while we
   * spin), saying first that we run there too. A polling end asks this every few looks (poll.ts).
   */
  sharesCpu(port: number): boolean {
    const lp = this.#ports.get(port);
    return lp ? runsWith(lp.ownWhere, lp.remoteWhere) : false;
  }

  /**
   * Say that we go back to sleep on `port` (not runnable until a send wakes us, or we look again). With
   * `peerWaits` (its remote end waits for our CPU), busy mode ends too, so the process really sleeps.
   */
  resting(port: number, peerWaits = false): void {
    const lp = this.#ports.get(port);
    if (lp) Atomics.and(lp.ownWhere, 0, ~WHERE_RUNNABLE);
    if (peerWaits) this.#leaveBusy();
  }

  /** True if any port with a handler, other than `except`, is pending: work waits elsewhere. */
  otherPending(except: number): boolean {
    return this.otherPendingSome(except, Infinity);
  }

  /**
   * otherPending() over at most `max` ports, starting where the last call stopped: a spin asks this
   * often, so a look costs a few loads (not a walk over every guest's port, during which its own ring
   * goes unwatched), and a few calls cover every port.
   */
  otherPendingSome(except: number, max = OTHER_PORTS_PER_LOOK): boolean {
    const list = this.#watchList();
    const n = list.length;
    let i = this.#cursor < n ? this.#cursor : 0;
    for (let k = Math.min(max, n); k > 0; k--) {
      const w = list[i]!;
      if (++i === n) i = 0;
      if (w.port !== except && Atomics.load(w.own, 0) & PENDING) {
        this.#cursor = i;
        return true;
      }
    }
    this.#cursor = i;
    return false;
  }

  off(port: number): void {
    this.#handlers.delete(port);
    this.#watched = null;
    this.#channelMasked.delete(port);
    const lp = this.#ports.get(port);
    if (this.#busy && lp) Atomics.and(lp.own, 0, ~MASKED);
  }

  #hypercall(op: number, args: number[], what: string, rep = this.#dom.hc.tryCall(op, args)): Reply {
    if (rep.status === 0) return rep;
    for (const fd of rep.fds) closeFd(fd);
    const code = rep.status === -ESRCH ? 'ESRCH' : rep.status === -ENOSPC ? 'ENOSPC' : 'EINVAL';
    throw new EventChannelError(code, `dom${this.#dom.domid}: ${what}`);
  }

  /**
   * EVTCHNOP_alloc_unbound: a fresh port that only `remoteDom` may bind to. startAllocUnbound sends it
   * now and takes the port later, so the caller's own work overlaps the hypervisor's.
   */
  allocUnbound(remoteDom: number): number {
    return this.startAllocUnbound(remoteDom)();
  }

  startAllocUnbound(remoteDom: number): () => number {
    const call = this.#dom.hc.start(HC.evtchn_alloc_unbound, [remoteDom]);
    return () => {
      const rep = this.#hypercall(HC.evtchn_alloc_unbound, [], `no free event channel port for dom${remoteDom}`, call.finish());
      this.#adopt(rep.r[0]!, rep.r[1]!, rep);
      return rep.r[0]!;
    };
  }

  /**
   * EVTCHNOP_bind_interdomain: connect a new local port to `remotePort` of `remoteDom`, which must be
   * unbound and allocated for us. The new port starts pending, covering sends made before the bind.
   */
  bindInterdomain(remoteDom: number, remotePort: number): number {
    if (!Number.isInteger(remotePort) || remotePort <= 0 || remotePort > 0xffff) {
      throw new EventChannelError('EINVAL', `dom${remoteDom} port ${remotePort} out of range`);
    }
    if (!Number.isInteger(remoteDom) || remoteDom < 0 || remoteDom > 0xffff) {
      throw new EventChannelError('ESRCH', `dom${remoteDom} does not exist`);
    }
    const rep = this.#hypercall(HC.evtchn_bind_interdomain, [remoteDom, remotePort], `bind to dom${remoteDom} port ${remotePort} refused (no such domain, or not unbound for us)`);
    const local = rep.r[0]!;
    this.#adopt(local, rep.r[1]!, rep);
    this.#scheduleDispatch();
    return local;
  }

  /** EVTCHNOP_send. On a port that is not ours the notification is dropped. */
  send(port: number): void {
    this.#checkPort(port);
    const lp = this.#ports.get(port);
    if (!lp) return;
    const was = Atomics.or(lp.remote, 0, PENDING);
    // A masked end is being polled (or will be checked at unmask): no wake-up at all.
    if (was & (MASKED | PENDING)) return;
    // Only the 0→1 edge wakes; one byte straight to the peer's pipe, the hot path of every round trip.
    // The byte makes the peer runnable: said in its where-word, for our next poll to see (sharesCpu).
    Atomics.or(lp.remoteWhere, 0, WHERE_RUNNABLE);
    try {
      fs.writeSync(lp.tx, this.#wake);
    } catch {
      // EAGAIN: the remote end has unread wake-ups already; EPIPE: it is gone. Either way, done.
    }
  }

  /**
   * EVTCHNOP_close: the local port is freed; an interdomain peer goes back to unbound. `wait: false`
   * (a teardown nobody waits on) posts the call instead of waiting for the hypervisor's answer.
   */
  close(port: number, opts: { wait?: boolean } = {}): void {
    this.#checkPort(port);
    this.#handlers.delete(port);
    this.#channelMasked.delete(port);
    this.#watched = null;
    const lp = this.#ports.get(port);
    if (!lp) return;
    this.#ports.delete(port);
    this.#release(lp);
    if (!this.#dom.hc.closed) {
      try {
        if (opts.wait === false) this.#dom.hc.post(HC.evtchn_close, [port]);
        else this.#dom.hc.tryCall(HC.evtchn_close, [port]);
      } catch {
        // The hypervisor is gone, and the channel with it.
      }
    }
  }

  #release(lp: LocalPort): void {
    lp.sock.destroy();
    closeFd(lp.tx);
    lp.page.unmap();
  }

  /** EVTCHNOP_status for one of our ports (routing from the hypervisor, bits from our word). */
  status(port: number): PortStatus {
    this.#checkPort(port);
    const rep = this.#hypercall(HC.evtchn_status, [port], `status of port ${port}`);
    const lp = this.#ports.get(port);
    const word = lp ? Atomics.load(lp.own, 0) : 0;
    return {
      state: rep.r[0]!,
      remoteDom: rep.r[1]!,
      remotePort: rep.r[2]!,
      pending: (word & PENDING) !== 0,
      masked: (word & MASKED) !== 0,
    };
  }

  #checkPort(port: number): void {
    const n = this.#dom.views.nrPorts;
    if (!Number.isInteger(port) || port <= 0 || port >= n) {
      throw new EventChannelError('EINVAL', `port ${port} out of range 1..${n - 1}`);
    }
  }

  #port(port: number): LocalPort {
    this.#checkPort(port);
    const lp = this.#ports.get(port);
    if (!lp) throw new EventChannelError('EINVAL', `port ${port} is not open`);
    return lp;
  }

  async shutdown(): Promise<void> {
    this.#busy = false;
    busyDomains.delete(this);
    this.#handlers.clear();
    this.#channelMasked.clear();
    this.#watched = null;
    for (const lp of this.#ports.values()) this.#release(lp);
    this.#ports.clear();
  }
}
