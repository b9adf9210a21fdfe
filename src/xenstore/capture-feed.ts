// The XenStore daemon's capture feed (docs/observability.md): a second UNIX socket beside the dom0
// socket, `<socket>.capture`, owner-only like it, where dom0 (the backend capturing a guest for
// `guest attach --pcap`) asks for copies of one guest's own xs_wire traffic: every packet the guest's
// connections send and every reply and watch event they get, stamped when the daemon saw it. The feed
// never slows a guest: records that find the subscriber's socket behind are left out and counted.
import net from 'node:net';
import { closeServer, listen, rmSocket } from './socket-files.js';
import { DOMID_MAX } from './permissions.js';
import { nowMicros } from '../util/pcapng.js';

/** Where the feed of the daemon listening on `socket` is. */
export function captureFeedPath(socket: string): string {
  return `${socket}.capture`;
}

/** Subscriber to daemon: 4 bytes, op u8, 0, domid u16 little-endian. */
export const FeedOp = { CAPTURE: 1, STOP: 2 } as const;
/** Daemon to subscriber: record kinds (byte 6 of the record header). */
export const FeedKind = { TO_GUEST: 0, FROM_GUEST: 1, SUBSCRIBED: 2 } as const;
/** Record header: length of what follows this field u32, domid u16, kind u8, 0, time in µs since the epoch u64 (all little-endian). */
export const FEED_HEADER = 16;
/** A subscriber whose socket holds more than this unread is sent nothing more until it drains. */
const FEED_BACKLOG = 4 << 20;

/** A guest connection's tap: called with its own packets only while some subscriber captures its domid. */
export type GuestTap = (kind: number, packet: Buffer) => void;

interface Subscriber {
  readonly socket: net.Socket;
  readonly domids: Set<number>;
}

export class CaptureFeed {
  readonly #server: net.Server;
  readonly #path: string;
  readonly #subs = new Set<Subscriber>();
  /** Called when the set of subscribers of `domid` changes: the daemon re-taps that domain's connections. */
  readonly #retap: (domid: number) => void;
  readonly #log: (line: string) => void;
  /** Records left out because a subscriber was behind. */
  dropped = 0;

  constructor(socket: string, retap: (domid: number) => void, log: (line: string) => void) {
    this.#path = captureFeedPath(socket);
    this.#retap = retap;
    this.#log = log;
    this.#server = net.createServer((s) => this.#accept(s));
  }

  async start(): Promise<void> {
    await listen(this.#server, this.#path);
    this.#server.on('error', (err) => this.#log(`capture feed socket: ${err.message}`));
  }

  async stop(): Promise<void> {
    for (const s of this.#subs) s.socket.destroy();
    await closeServer(this.#server);
    rmSocket(this.#path);
  }

  /** The tap for a connection of `domid`, or null while nobody captures it. */
  tapFor(domid: number): GuestTap | null {
    const subs = [...this.#subs].filter((s) => s.domids.has(domid));
    if (subs.length === 0) return null;
    return (kind, packet) => {
      const now = nowMicros();
      const h = Buffer.allocUnsafe(FEED_HEADER);
      h.writeUInt32LE(FEED_HEADER - 4 + packet.length, 0);
      h.writeUInt16LE(domid, 4);
      h.writeUInt8(kind, 6);
      h.writeUInt8(0, 7);
      h.writeUInt32LE(now % 2 ** 32, 8);
      h.writeUInt32LE(Math.floor(now / 2 ** 32), 12);
      for (const s of subs) this.#send(s, h, packet);
    };
  }

  #send(s: Subscriber, h: Buffer, packet: Buffer): void {
    if (s.socket.destroyed) return;
    if (s.socket.writableLength > FEED_BACKLOG) {
      this.dropped++;
      return;
    }
    s.socket.cork();
    s.socket.write(h);
    s.socket.write(packet);
    s.socket.uncork();
  }

  #accept(socket: net.Socket): void {
    const sub: Subscriber = { socket, domids: new Set() };
    this.#subs.add(sub);
    let pending: Buffer = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
      let o = 0;
      for (; o + 4 <= pending.length; o += 4) {
        const op = pending[o]!;
        const domid = pending.readUInt16LE(o + 2);
        if ((op !== FeedOp.CAPTURE && op !== FeedOp.STOP) || pending[o + 1] !== 0 || domid === 0 || domid > DOMID_MAX) {
          this.#log(`capture feed: bad request ${pending.subarray(o, o + 4).toString('hex')}; closing that subscriber`);
          socket.destroy();
          return;
        }
        if (op === FeedOp.CAPTURE) sub.domids.add(domid);
        else sub.domids.delete(domid);
        this.#retap(domid);
        if (op === FeedOp.CAPTURE) {
          // Acknowledged once the domain's connections are tapped: whatever the subscriber does next is seen.
          // (Written even when the subscriber is behind: it waits for this.)
          const ack = Buffer.alloc(FEED_HEADER);
          ack.writeUInt32LE(FEED_HEADER - 4, 0);
          ack.writeUInt16LE(domid, 4);
          ack.writeUInt8(FeedKind.SUBSCRIBED, 6);
          socket.write(ack);
        }
      }
      pending = pending.subarray(o);
    });
    const gone = (): void => {
      if (!this.#subs.delete(sub)) return;
      for (const d of sub.domids) this.#retap(d);
    };
    socket.on('error', gone);
    socket.on('close', gone);
  }
}
