// One xs_wire connection of the XenStore daemon: its receiver, its queue of requests (answered one at a
// time, in order), its watches and transactions, and the outstanding-request quota that stops reading
// a guest that does not read its replies. Output of one received chunk leaves in one write (OutputBatch).
import type net from 'node:net';
import { trace, tracing } from '../util/trace.js';
import type { Caller, Quotas, Transaction } from './store.js';
import { XsReceiver, XsWireError, encodeMessage, typeName, type XsMessage } from './wire.js';
import { FeedKind, type GuestTap } from './capture-feed.js';

/** A slow reader whose socket buffer grows past this is disconnected (bounds memory per connection). */
const MAX_WRITE_BACKLOG = 1 << 20;
/** dom0 is exempt from the outstanding-request quota, but a dom0 client that never reads still
 * stops being read rather than growing our memory. */
const DOM0_OUTSTANDING = 1024;

export interface Watch {
  /** The path as registered (relative paths produce relative event paths). */
  readonly given: string;
  /** Canonical absolute path, or the special name. */
  readonly abs: string;
  readonly token: string;
}

/** What a connection needs of its daemon. */
export interface ConnectionHost {
  readonly quotas: Quotas;
  readonly output: OutputBatch;
  /** Close this connection alone, with a log line when `why` is given. */
  kill(c: Connection, why?: string): void;
  /** Answer one request; a promise only for requests that must wait. */
  handle(c: Connection, m: XsMessage): Promise<void> | undefined;
}

/** While held (a received chunk is being handled), output is corked; `corked` holds whose. */
export class OutputBatch {
  private held = 0;
  private readonly corked = new Set<Connection>();

  /**
   * Start handling received bytes: replies and events wait until release(). Each write to a socket
   * wakes its reader, which on a busy machine preempts us before the next request of the same batch
   * is even parsed; written together at the end, a pipelined batch costs each peer one wake-up.
   */
  hold(): void {
    this.held++;
  }

  /** Done with received bytes: flush what was corked (in order, one writev per connection). */
  release(): void {
    if (--this.held > 0) return;
    for (const c of this.corked) if (!c.closed) c.socket.uncork();
    this.corked.clear();
  }

  /** A connection about to write: cork it while a batch is held. */
  cork(c: Connection): void {
    if (this.held === 0 || this.corked.has(c)) return;
    c.socket.cork();
    this.corked.add(c);
  }
}

let connSerial = 0;

export class Connection implements Caller {
  readonly receiver: XsReceiver;
  readonly serial = ++connSerial;
  readonly watches = new Map<string, Watch>();
  readonly txs = new Map<number, Transaction>();
  private readonly queue: XsMessage[] = [];
  private busy = false;
  closed = false;
  /** Why the daemon cut this connection off (a metric label from a fixed set), if it did. */
  cutOffReason: string | null = null;
  /** Copies of this guest connection's packets for its capture, while dom0 asks for them (capture-feed.ts). */
  tap: GuestTap | null = null;

  constructor(
    readonly daemon: ConnectionHost,
    readonly socket: net.Socket,
    readonly domid: number,
  ) {
    this.receiver = new XsReceiver((m) => this.enqueue(m));
    socket.on('data', (chunk: Buffer) => {
      // Every reply and watch event this chunk causes leaves at its end, one write per connection.
      this.daemon.output.hold();
      try {
        this.receiver.push(chunk);
      } catch (err) {
        this.cutOffReason = err instanceof XsWireError ? err.code.toLowerCase() : 'internal';
        this.daemon.kill(this, err instanceof XsWireError ? err.message : String(err));
      } finally {
        this.daemon.output.release();
      }
    });
    socket.on('error', () => this.daemon.kill(this));
    socket.on('close', () => this.daemon.kill(this));
  }

  get privileged(): boolean {
    return this.domid === 0;
  }

  get home(): string {
    return `/local/domain/${this.domid}`;
  }

  /** Replies written but not yet taken by the kernel: the guest's outstanding requests. */
  private unflushed = 0;

  private enqueue(m: XsMessage): void {
    if (tracing) trace(`xs c${this.serial} d${this.domid} < ${typeName(m.type)} ${m.reqId} ${m.payload.toString('latin1').replace(/\0/g, '|')}`);
    this.tap?.(FeedKind.FROM_GUEST, encodeMessage(m.type, m.reqId, m.txId, m.payload));
    this.queue.push(m);
    this.drain();
  }

  private get stalled(): boolean {
    return this.unflushed >= (this.privileged ? DOM0_OUTSTANDING : this.daemon.quotas.outstanding);
  }

  private drain(): void {
    while (!this.busy && !this.closed && !this.stalled && this.queue.length) {
      const m = this.queue.shift()!;
      const r = this.daemon.handle(this, m);
      if (r) {
        this.busy = true;
        void r.finally(() => {
          this.busy = false;
          this.drain();
        });
      }
    }
    if (this.closed) return;
    // Outstanding-request quota: a guest that does not read its replies stops being read, so neither
    // its requests nor our replies pile up in memory.
    if (this.stalled || (!this.privileged && this.queue.length >= this.daemon.quotas.outstanding)) this.socket.pause();
    else if (this.socket.isPaused()) this.socket.resume();
  }

  /** Send a reply (counted against the outstanding quota until the kernel has it). */
  reply(frame: Buffer): void {
    if (this.closed) return;
    this.unflushed++;
    if (tracing) trace(`xs c${this.serial} > ${typeName(frame.readUInt32LE(0))} ${frame.readUInt32LE(4)}`);
    this.tap?.(FeedKind.TO_GUEST, frame);
    this.daemon.output.cork(this);
    this.socket.write(frame, () => {
      this.unflushed--;
      if (!this.closed) this.drain();
    });
  }

  /** Send a frame nobody asked for (watch events); a reader too slow for them is disconnected. */
  send(frame: Buffer): void {
    if (this.closed) return;
    if (this.socket.writableLength > MAX_WRITE_BACKLOG) {
      this.cutOffReason = 'unread_watch_events';
      this.daemon.kill(this, `dom${this.domid} does not read its watch events`);
      return;
    }
    if (tracing) trace(`xs c${this.serial} ! ${frame.subarray(16).toString('latin1').replace(/\0/g, '|')}`);
    this.tap?.(FeedKind.TO_GUEST, frame);
    this.daemon.output.cork(this);
    this.socket.write(frame);
  }
}
