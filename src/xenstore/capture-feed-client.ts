// dom0's end of the XenStore daemon's capture feed (capture-feed.ts, docs/observability.md): asks for
// copies of a guest's own xs_wire traffic and hands each record to that guest's listener. One
// connection for all guests, opened at the first capture; after the daemon restarts it reconnects and
// asks again. Records come from the daemon, not a guest, but are still checked before use.
import net from 'node:net';
import { FEED_HEADER, FeedKind, FeedOp, captureFeedPath } from './capture-feed.js';
import { HEADER_SIZE, PAYLOAD_MAX } from './wire.js';

/** One guest packet: `fromGuest`, the daemon's time stamp (µs since the epoch) and the xs_wire packet. */
export type FeedListener = (fromGuest: boolean, micros: number, packet: Buffer) => void;

const RECONNECT_MS = 500;
const ACK_TIMEOUT_MS = 5000;

export class CaptureFeedClient {
  readonly #path: string;
  readonly #log: (line: string) => void;
  readonly #listeners = new Map<number, FeedListener>();
  readonly #acks = new Map<number, Array<() => void>>();
  #socket: net.Socket | null = null;
  #connecting: Promise<net.Socket | null> | null = null;
  #retry: NodeJS.Timeout | null = null;
  #pending: Buffer = Buffer.alloc(0);
  #warned = false;

  /** `xenstoredSocket`: the daemon's dom0 socket (the feed is beside it). */
  constructor(xenstoredSocket: string, log: (line: string) => void) {
    this.#path = captureFeedPath(xenstoredSocket);
    this.#log = log;
  }

  /**
   * Start receiving `domid`'s xenstore traffic. Resolves once the daemon taps the guest (what the guest
   * does after that is seen), or when the feed cannot be had (logged once; the capture goes on without).
   */
  async add(domid: number, listener: FeedListener): Promise<void> {
    this.#listeners.set(domid, listener);
    const s = await this.#connect();
    if (s && this.#listeners.get(domid) === listener) await this.#request(s, FeedOp.CAPTURE, domid);
  }

  remove(domid: number): void {
    if (!this.#listeners.delete(domid)) return;
    if (this.#socket) this.#socket.write(op(FeedOp.STOP, domid));
    if (this.#listeners.size === 0) this.close();
  }

  close(): void {
    if (this.#retry) clearTimeout(this.#retry);
    this.#retry = null;
    this.#socket?.destroy();
    this.#socket = null;
    for (const waiting of this.#acks.values()) for (const f of waiting) f();
    this.#acks.clear();
  }

  #request(s: net.Socket, o: number, domid: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(), ACK_TIMEOUT_MS);
      timer.unref();
      const waiting = this.#acks.get(domid) ?? [];
      waiting.push(() => {
        clearTimeout(timer);
        resolve();
      });
      this.#acks.set(domid, waiting);
      s.write(op(o, domid));
    });
  }

  #connect(): Promise<net.Socket | null> {
    if (this.#socket) return Promise.resolve(this.#socket);
    this.#connecting ??= new Promise<net.Socket | null>((resolve) => {
      const s = net.createConnection(this.#path);
      s.once('connect', () => {
        this.#socket = s;
        this.#pending = Buffer.alloc(0);
        this.#warned = false;
        resolve(s);
      });
      s.on('data', (chunk: Buffer) => this.#data(s, chunk));
      s.on('error', (err) => {
        if (this.#socket !== s) {
          if (!this.#warned) this.#log(`xenstore capture feed ${this.#path}: ${err.message}; guests' own xenstore traffic is not captured`);
          this.#warned = true;
          resolve(null);
        }
      });
      s.once('close', () => {
        if (this.#socket !== s) return;
        this.#socket = null;
        // The daemon went away (a restart): ask again once it is back, for every guest still captured.
        if (this.#listeners.size > 0) this.#scheduleReconnect();
      });
    }).finally(() => {
      this.#connecting = null;
    });
    return this.#connecting;
  }

  #scheduleReconnect(): void {
    if (this.#retry) return;
    this.#retry = setTimeout(() => {
      this.#retry = null;
      if (this.#listeners.size === 0) return;
      void this.#connect().then((s) => {
        if (!s) return this.#scheduleReconnect();
        for (const d of this.#listeners.keys()) s.write(op(FeedOp.CAPTURE, d));
      });
    }, RECONNECT_MS);
    this.#retry.unref();
  }

  #data(s: net.Socket, chunk: Buffer): void {
    this.#pending = this.#pending.length ? Buffer.concat([this.#pending, chunk]) : chunk;
    let o = 0;
    while (o + FEED_HEADER <= this.#pending.length) {
      const len = this.#pending.readUInt32LE(o);
      if (len < FEED_HEADER - 4 || len > FEED_HEADER - 4 + HEADER_SIZE + PAYLOAD_MAX) {
        this.#log(`xenstore capture feed: record of ${len} bytes; closing it`);
        s.destroy();
        return;
      }
      if (o + 4 + len > this.#pending.length) break;
      const domid = this.#pending.readUInt16LE(o + 4);
      const kind = this.#pending[o + 6]!;
      const micros = this.#pending.readUInt32LE(o + 12) * 2 ** 32 + this.#pending.readUInt32LE(o + 8);
      const packet = this.#pending.subarray(o + FEED_HEADER, o + 4 + len);
      o += 4 + len;
      if (kind === FeedKind.SUBSCRIBED) {
        const waiting = this.#acks.get(domid);
        this.#acks.delete(domid);
        for (const f of waiting ?? []) f();
      } else if (packet.length >= HEADER_SIZE) this.#listeners.get(domid)?.(kind === FeedKind.FROM_GUEST, micros, packet);
    }
    this.#pending = this.#pending.subarray(o);
  }
}

function op(o: number, domid: number): Buffer {
  const b = Buffer.alloc(4);
  b[0] = o;
  b.writeUInt16LE(domid, 2);
  return b;
}
