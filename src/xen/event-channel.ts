// Event channels (docs/protocols/event-channels.md): alloc_unbound, bind_interdomain, send, close as Xen has them.
// The port table lives in each domain's memory file (state, remote domain, remote port, and a word
// holding the pending bit and the mask bit); a send sets the remote port's pending bit and, only on its
// 0→1 edge and only when the port is not masked, wakes the remote process. A process busy-polling its
// ring masks the port (EVTCHNOP_unmask's other half): peers then notify it for the price of one atomic
// OR instead of a wake-up write, which costs 12–20 µs here (the syscall wakes the other CPU).
//
// Wake-up transport: one UNIX stream socket listener per domain, one connection per sending peer,
// carrying the 4-byte number of the port that became pending. Node has no AF_UNIX datagrams; a stream
// socket wakes the receiver's libuv loop through epoll with no polling, costs one write per edge (the
// pending bit coalesces the rest), and unlike a FIFO tells the sender when the receiver died.
import fs from 'node:fs';
import net from 'node:net';
import { evtchnSocketPath } from './layout.js';
import { DomainError, type Domain, type PeerDomain } from './domain.js';
import { PollWindow, cpuContended, defaultPollUs } from './poll.js';

export const ECS_closed = 0;
export const ECS_unbound = 1;
export const ECS_interdomain = 2;

const F_STATE = 0;
const F_REMOTE_DOM = 1;
const F_REMOTE_PORT = 2;
/** Bit 0 of this word: pending; bit 1: masked (Xen keeps them in two bitmaps; one word is enough). */
const F_PENDING = 3;
const PENDING = 1;
const MASKED = 2;

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

/** The fd of a connected UNIX socket, or -1 (still connecting, or a handle without one). */
function connectedFd(sock: net.Socket): number {
  if (sock.connecting || sock.destroyed) return -1;
  const handle = (sock as unknown as { _handle?: { fd?: number } })._handle;
  return typeof handle?.fd === 'number' ? handle.fd : -1;
}

// Busy mode, the idea of Linux NAPI: a process that was just woken usually has more work coming (a
// backend serving many guests, a guest whose next answer follows). While busy, every handled port of
// the domain stays masked, so peers' sends cost them one atomic OR instead of a wake-up write (12–20 µs
// here, see above), and the process looks for pending ports itself once per turn of its event loop.
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

export class EventChannels {
  readonly #dom: Domain;
  readonly #handlers = new Map<number, Handler>();
  readonly #conns = new Map<number, net.Socket>();
  readonly #accepted = new Set<net.Socket>();
  #server: net.Server | null = null;
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

  constructor(dom: Domain) {
    this.#dom = dom;
  }

  get #table(): Int32Array {
    return this.#dom.views.evtchn;
  }

  /** Start accepting wake-ups from peers. Called once by Domain.create. */
  async listen(): Promise<void> {
    const path = evtchnSocketPath(this.#dom.dir, this.#dom.domid);
    fs.rmSync(path, { force: true });
    const server = net.createServer((sock) => this.#accept(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    // Peers and their sockets must not keep a process alive on their own.
    server.unref();
    this.#server = server;
  }

  #accept(sock: net.Socket): void {
    this.#accepted.add(sock);
    sock.unref();
    let carry: Buffer | null = null;
    sock.on('data', (chunk: Buffer) => {
      let buf = carry ? Buffer.concat([carry, chunk]) : chunk;
      let off = 0;
      for (; off + 4 <= buf.length; off += 4) this.#deliver(buf.readUInt32LE(off));
      carry = off < buf.length ? Buffer.from(buf.subarray(off)) : null;
      buf = chunk;
    });
    sock.on('error', () => sock.destroy());
    sock.on('close', () => this.#accepted.delete(sock));
  }

  /** Clear the pending bit and run the port's handler, if it has one (else the bit stays set). */
  #deliver(port: number): void {
    if (!Number.isInteger(port) || port <= 0 || port >= this.#dom.views.nrPorts) return;
    const h = this.#handlers.get(port);
    if (!h) return;
    // A port its channel masked keeps its pending bit for unmask() (or the channel's poll) to find, as
    // in Xen; the masks of busy mode are ours, and we are looking.
    if (this.#channelMasked.has(port)) return;
    if ((Atomics.and(this.#table, 4 * port + F_PENDING, ~PENDING) & PENDING) === 0) return;
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
    const t = this.#table;
    for (const port of this.#handlers.keys()) Atomics.or(t, 4 * port + F_PENDING, MASKED);
    busyDomains.add(this);
    queuePoll();
  }

  /** One turn of busy mode (called by the process's poller): deliver what is pending, or leave. */
  pollTurn(now: number): void {
    const t = this.#table;
    let found = false;
    for (const port of this.#handlers.keys()) {
      if (Atomics.load(t, 4 * port + F_PENDING) & PENDING && !this.#channelMasked.has(port)) {
        this.#deliver(port);
        found = true;
      }
    }
    if (found || !this.#busy) return;
    if (this.#quietUs < 0) this.#quietUs = this.#busyWindow.budgetUs;
    if ((now - this.#lastWorkAt) * 1000 >= this.#quietUs) this.#leaveBusy();
  }

  /** Unmask the ports busy mode masked; one that became pending meanwhile is delivered (later turn). */
  #leaveBusy(): void {
    if (!this.#busy) return;
    this.#busy = false;
    busyDomains.delete(this);
    const t = this.#table;
    let pending = false;
    for (const port of this.#handlers.keys()) {
      if (this.#channelMasked.has(port)) continue;
      if (Atomics.and(t, 4 * port + F_PENDING, ~MASKED) & PENDING) pending = true;
    }
    if (pending) this.#scheduleDispatch();
  }

  /** Deliver every pending port that has a handler, on a later turn of the loop. */
  #scheduleDispatch(): void {
    if (this.#dispatchQueued) return;
    this.#dispatchQueued = true;
    setImmediate(() => {
      this.#dispatchQueued = false;
      for (const port of [...this.#handlers.keys()]) this.#deliver(port);
    });
  }

  /** The handler run (without data) whenever `port` becomes pending; replaces any earlier one. */
  on(port: number, handler: Handler): void {
    this.#checkPort(port);
    this.#handlers.set(port, handler);
    if (this.#busy) Atomics.or(this.#table, 4 * port + F_PENDING, MASKED);
    if (Atomics.load(this.#table, 4 * port + F_PENDING) & PENDING) this.#scheduleDispatch();
  }

  /**
   * Mask `port` while this process polls the shared state behind it: sends still set the pending bit
   * but wake nobody. Pair with unmask() before waiting for a notification again.
   */
  mask(port: number): void {
    this.#checkPort(port);
    this.#channelMasked.add(port);
    Atomics.or(this.#table, 4 * port + F_PENDING, MASKED);
  }

  /**
   * EVTCHNOP_unmask: clear the mask; a port that became pending meanwhile is delivered (later turn).
   * In busy mode the port stays masked in the table (peers need not wake us: we are looking anyway).
   */
  unmask(port: number): void {
    this.#checkPort(port);
    this.#channelMasked.delete(port);
    const t = this.#table;
    const was = this.#busy && this.#handlers.has(port) ? Atomics.load(t, 4 * port + F_PENDING) : Atomics.and(t, 4 * port + F_PENDING, ~MASKED);
    if (was & PENDING) this.#scheduleDispatch();
  }

  /**
   * Clear `port`'s pending bit and say whether it was set: a poller that found its work in shared
   * memory consumes the notification that came with it, so unmask() does not deliver it again.
   */
  consume(port: number): boolean {
    this.#checkPort(port);
    return (Atomics.and(this.#table, 4 * port + F_PENDING, ~PENDING) & PENDING) !== 0;
  }

  /** True if any port with a handler, other than `except`, is pending: work waits elsewhere. */
  otherPending(except: number): boolean {
    const t = this.#table;
    for (const port of this.#handlers.keys()) {
      if (port !== except && Atomics.load(t, 4 * port + F_PENDING) & PENDING) return true;
    }
    return false;
  }

  off(port: number): void {
    this.#handlers.delete(port);
    this.#channelMasked.delete(port);
    if (this.#busy) Atomics.and(this.#table, 4 * port + F_PENDING, ~MASKED);
  }

  /** EVTCHNOP_alloc_unbound: a fresh port that only `remoteDom` may bind to. */
  allocUnbound(remoteDom: number): number {
    const t = this.#table;
    for (let port = 1, n = this.#dom.views.nrPorts; port < n; port++) {
      if (Atomics.compareExchange(t, 4 * port + F_STATE, ECS_closed, -1) !== ECS_closed) continue;
      Atomics.store(t, 4 * port + F_REMOTE_DOM, remoteDom);
      Atomics.store(t, 4 * port + F_REMOTE_PORT, 0);
      Atomics.store(t, 4 * port + F_PENDING, 0);
      Atomics.store(t, 4 * port + F_STATE, ECS_unbound);
      return port;
    }
    throw new EventChannelError('ENOSPC', `dom${this.#dom.domid}: no free event channel port`);
  }

  /**
   * EVTCHNOP_bind_interdomain: connect a new local port to `remotePort` of `remoteDom`, which must be
   * unbound and allocated for us. The new port starts pending, covering sends made before the bind.
   */
  bindInterdomain(remoteDom: number, remotePort: number): number {
    let peer: PeerDomain;
    try {
      peer = this.#dom.peer(remoteDom, true);
    } catch (err) {
      if (err instanceof DomainError) throw new EventChannelError('ESRCH', `dom${remoteDom} does not exist`);
      throw err;
    }
    if (!Number.isInteger(remotePort) || remotePort <= 0 || remotePort >= peer.views.nrPorts) {
      throw new EventChannelError('EINVAL', `dom${remoteDom} port ${remotePort} out of range`);
    }
    const rt = peer.views.evtchn;
    if (
      Atomics.load(rt, 4 * remotePort + F_STATE) !== ECS_unbound ||
      Atomics.load(rt, 4 * remotePort + F_REMOTE_DOM) !== this.#dom.domid
    ) {
      throw new EventChannelError('EINVAL', `dom${remoteDom} port ${remotePort} is not unbound for dom${this.#dom.domid}`);
    }
    const local = this.allocUnbound(remoteDom);
    const t = this.#table;
    Atomics.store(t, 4 * local + F_REMOTE_PORT, remotePort);
    Atomics.store(t, 4 * local + F_STATE, ECS_interdomain);
    Atomics.store(rt, 4 * remotePort + F_REMOTE_PORT, local);
    // The CAS makes two binders racing for one unbound port come out with exactly one winner.
    if (Atomics.compareExchange(rt, 4 * remotePort + F_STATE, ECS_unbound, ECS_interdomain) !== ECS_unbound) {
      this.#free(local);
      throw new EventChannelError('EINVAL', `dom${remoteDom} port ${remotePort} was bound by someone else`);
    }
    Atomics.store(t, 4 * local + F_PENDING, 1);
    this.#scheduleDispatch();
    return local;
  }

  /** EVTCHNOP_send. On a port that is not (or no longer) connected the notification is dropped. */
  send(port: number): void {
    this.#checkPort(port);
    const t = this.#table;
    if (Atomics.load(t, 4 * port + F_STATE) !== ECS_interdomain) return;
    const remoteDom = Atomics.load(t, 4 * port + F_REMOTE_DOM);
    const remotePort = Atomics.load(t, 4 * port + F_REMOTE_PORT);
    let peer: PeerDomain;
    try {
      peer = this.#dom.peer(remoteDom);
    } catch {
      return;
    }
    const rt = peer.views.evtchn;
    // The remote end may have closed (back to unbound) or been reused: then the event goes nowhere.
    if (
      Atomics.load(rt, 4 * remotePort + F_STATE) !== ECS_interdomain ||
      Atomics.load(rt, 4 * remotePort + F_REMOTE_PORT) !== port ||
      Atomics.load(rt, 4 * remotePort + F_REMOTE_DOM) !== this.#dom.domid
    ) {
      return;
    }
    const was = Atomics.or(rt, 4 * remotePort + F_PENDING, PENDING);
    // A masked port is being polled (or will be checked at unmask): no wake-up at all.
    if (was & MASKED) return;
    const fresh = !this.#conns.has(remoteDom);
    // Only the 0→1 edge needs a wake-up; a new connection always sends one, because an earlier one
    // may have died with its edge undelivered and the bit left set.
    if ((was & PENDING) === 0 || fresh) this.#wakeNow(remoteDom, remotePort);
  }

  #wakeNow(remoteDom: number, port: number): void {
    let sock = this.#conns.get(remoteDom);
    if (!sock) {
      sock = net.createConnection(evtchnSocketPath(this.#dom.dir, remoteDom));
      sock.unref();
      const s = sock;
      s.on('error', () => s.destroy());
      s.on('close', () => {
        if (this.#conns.get(remoteDom) === s) this.#conns.delete(remoteDom);
      });
      this.#conns.set(remoteDom, s);
    }
    const msg = Buffer.allocUnsafe(4);
    msg.writeUInt32LE(port, 0);
    // Once connected, one write(2) straight to the socket: a 4-byte wake-up does not need the stream
    // machinery's buffering and callbacks, and this is the hot path of every ring round trip.
    const fd = connectedFd(sock);
    if (fd >= 0 && sock.writableLength === 0) {
      try {
        const n = fs.writeSync(fd, msg);
        if (n === msg.length) return;
        sock.write(msg.subarray(n));
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') {
          sock.destroy();
          return;
        }
      }
    }
    sock.write(msg);
  }

  /** EVTCHNOP_close: the local port is freed; an interdomain peer goes back to unbound. */
  close(port: number): void {
    this.#checkPort(port);
    const t = this.#table;
    const state = Atomics.load(t, 4 * port + F_STATE);
    if (state === ECS_interdomain) {
      const remoteDom = Atomics.load(t, 4 * port + F_REMOTE_DOM);
      const remotePort = Atomics.load(t, 4 * port + F_REMOTE_PORT);
      try {
        const rt = this.#dom.peer(remoteDom).views.evtchn;
        if (
          Atomics.load(rt, 4 * remotePort + F_REMOTE_PORT) === port &&
          Atomics.load(rt, 4 * remotePort + F_REMOTE_DOM) === this.#dom.domid
        ) {
          Atomics.compareExchange(rt, 4 * remotePort + F_STATE, ECS_interdomain, ECS_unbound);
        }
      } catch {
        // The peer domain is gone: nothing to unbind there.
      }
    }
    this.#handlers.delete(port);
    this.#channelMasked.delete(port);
    this.#free(port);
  }

  #free(port: number): void {
    const t = this.#table;
    Atomics.store(t, 4 * port + F_PENDING, 0);
    Atomics.store(t, 4 * port + F_REMOTE_PORT, 0);
    Atomics.store(t, 4 * port + F_REMOTE_DOM, 0);
    Atomics.store(t, 4 * port + F_STATE, ECS_closed);
  }

  /** EVTCHNOP_status for one of our ports. */
  status(port: number): PortStatus {
    this.#checkPort(port);
    const t = this.#table;
    return {
      state: Math.max(0, Atomics.load(t, 4 * port + F_STATE)),
      remoteDom: Atomics.load(t, 4 * port + F_REMOTE_DOM),
      remotePort: Atomics.load(t, 4 * port + F_REMOTE_PORT),
      pending: (Atomics.load(t, 4 * port + F_PENDING) & PENDING) !== 0,
      masked: (Atomics.load(t, 4 * port + F_PENDING) & MASKED) !== 0,
    };
  }

  #checkPort(port: number): void {
    const n = this.#dom.views.nrPorts;
    if (!Number.isInteger(port) || port <= 0 || port >= n) {
      throw new EventChannelError('EINVAL', `port ${port} out of range 1..${n - 1}`);
    }
  }

  async shutdown(): Promise<void> {
    this.#busy = false;
    busyDomains.delete(this);
    this.#handlers.clear();
    this.#channelMasked.clear();
    for (const s of this.#conns.values()) s.destroy();
    this.#conns.clear();
    for (const s of this.#accepted) s.destroy();
    this.#accepted.clear();
    const server = this.#server;
    this.#server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  removeSocket(): void {
    fs.rmSync(evtchnSocketPath(this.#dom.dir, this.#dom.domid), { force: true });
  }
}
