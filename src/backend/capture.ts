// A guest's capture (`guest attach --pcap FILE`, `qemu attach --pcap FILE`; docs/observability.md):
// a pcapng file the backend writes with two interfaces.
//   0: LINKTYPE_RAW, IPv4/TCP. Each TPM command and response is one TCP segment of a stream between
//      the guest (10.H.L.2, port 49152+n) and its vTPM (10.H.L.1, port 2321, H.L = domid): Wireshark's
//      TPM 2.0 dissector decodes TCP port 2321, a request being the segment from the higher port.
//      A new connection of the device (a resume, a QEMU CMD_INIT) opens a new stream.
//   1: LINKTYPE_USER0, vtpm-split events (tools/wireshark/vtpm-split.lua): the device's xenstore
//      traffic as the backend sent and received it, the guest's own xenstore traffic as xenstored saw
//      it (its capture feed), and the ring events.
import { LINKTYPE_RAW, LINKTYPE_USER0, PcapngWriter, microsAt, nowMicros } from '../util/pcapng.js';
import { CaptureFeedClient } from '../xenstore/capture-feed-client.js';

export const TPM_PORT = 2321;

/** Event kinds of the USER0 records (byte 1). */
export const EventKind = { XENSTORE: 1, RING: 2, NOTE: 3, GUEST_XENSTORE: 4 } as const;
/** Ring events (byte 8 of a RING record). */
export const RingEvent = {
  NOTIFY_IN: 1,
  REQUEST: 2,
  RESPONSE: 3,
  NOTIFY_OUT: 4,
  V2_SUBMIT: 5,
  V2_FINISH: 6,
  V2_CANCEL: 7,
} as const;

/**
 * What the channels report for a capture: an event (RingEvent), its status or locality, segment count,
 * length and ring request id (v2: none), all numbers the channel has already validated, and when it
 * happened if the channel read the clock anyway (performance.now(); else the capture reads it). Plain
 * arguments, no object: a tap runs on the guest's path.
 */
export interface RingTap {
  (event: number, statusOrLocality?: number, segments?: number, length?: number, id?: bigint, at?: number): void;
}

/** The queue entry of a command and its response (RingEvent values are 1..7). */
const COMMAND = 0;

export class GuestCapture {
  readonly #w: PcapngWriter;
  readonly #domid: number;
  readonly #devid: number;
  #stream = -1;
  #seqGuest = 0;
  #seqVtpm = 0;
  /** The 40-byte IPv4 + TCP headers of this stream, guest to vTPM and back, and their IP checksums' sums. */
  readonly #hdrGuest = new Uint8Array(40);
  readonly #hdrVtpm = new Uint8Array(40);
  #sumGuest = 0;
  #sumVtpm = 0;
  /** 10.H.L.2 (the guest) and 10.H.L.1 (its vTPM) as u32, H.L = domid. */
  readonly #guestIp: number;
  readonly #vtpmIp: number;
  /**
   * Records waiting to be encoded, in order: ring events and commands with their responses (parallel
   * arrays, reused; a number each, no object per record). They are encoded once the answer is published
   * (the v2 FINISH or the ring's notification, taps from the channel), or on setImmediate for a
   * transport without such taps, so what a capture writes never runs before a guest's answer.
   */
  readonly #qEvent: number[] = []; // RingEvent, or COMMAND
  readonly #qT0: number[] = []; // performance.now(): the event, or the command reaching the vTPM
  readonly #qT1: number[] = []; // a command's response ready
  readonly #qA: number[] = []; // status or locality
  readonly #qSeg: number[] = [];
  readonly #qLen: number[] = [];
  readonly #qId: bigint[] = [];
  readonly #qCmd: Array<Uint8Array | null> = [];
  readonly #qRsp: Array<Uint8Array | null> = [];
  #pending = 0;
  /** This connection's channel reports every publication (v2 FINISH): no setImmediate needed. */
  #published = false;
  #scheduled = false;

  constructor(path: string, maxBytes: number, domid: number, devid: number, log: (line: string) => void) {
    this.#w = new PcapngWriter(path, [LINKTYPE_RAW, LINKTYPE_USER0], maxBytes);
    this.#w.onFull = () => log(`dom${domid}: capture ${path} reached ${maxBytes} bytes; later packets are left out`);
    this.#domid = domid;
    this.#devid = devid;
    this.#vtpmIp = ((10 << 24) | ((domid & 0xffff) << 8) | 1) >>> 0;
    this.#guestIp = (this.#vtpmIp + 1) >>> 0;
  }

  get path(): string {
    return this.#w.path;
  }

  /** A new connection (a ring or page mapped, an endpoint initialised): a new TCP stream. */
  newStream(): void {
    this.#encodePending();
    // The new connection may use another transport: it shows again whether it reports publications.
    this.#published = false;
    this.#open(nowMicros());
  }

  #open(ts: number): void {
    this.#stream++;
    this.#seqGuest = 1000;
    this.#seqVtpm = 5000;
    const guestPort = 49152 + (this.#stream % 16384);
    this.#sumGuest = headerTemplate(this.#hdrGuest, this.#guestIp, this.#vtpmIp, guestPort, TPM_PORT);
    this.#sumVtpm = headerTemplate(this.#hdrVtpm, this.#vtpmIp, this.#guestIp, TPM_PORT, guestPort);
    this.#tcp(ts, true, SYN, null, this.#seqGuest - 1, 0);
    this.#tcp(ts, false, SYN | ACK, null, this.#seqVtpm - 1, this.#seqGuest);
    this.#tcp(ts, true, ACK, null, this.#seqGuest, this.#seqVtpm);
  }

  /**
   * One command, stamped when it reached the vTPM (`t0`, performance.now()), and its response, stamped
   * `t1` (null: the vTPM gave none; only the command is recorded).
   */
  command(command: Uint8Array, response: Uint8Array | null, t0: number, t1: number = performance.now()): void {
    const i = this.#push(COMMAND, t0);
    this.#qT1[i] = t1;
    this.#qCmd[i] = command;
    this.#qRsp[i] = response;
  }

  /** A ring event (see RingEvent), queued; the answer's publication (V2_FINISH, NOTIFY_OUT) encodes the queue. */
  readonly ring: RingTap = (event, a = 0, segments = 0, length = 0, id = 0n, at = performance.now()) => {
    const i = this.#push(event, at);
    this.#qA[i] = a;
    this.#qSeg[i] = segments;
    this.#qLen[i] = length;
    this.#qId[i] = id;
    if (event === RingEvent.V2_FINISH) this.#published = true;
    if (event === RingEvent.V2_FINISH || event === RingEvent.NOTIFY_OUT) this.#encodePending();
    // A CANCEL on an idle v2 device is answered IDLE, which publishes nothing.
    else if (event === RingEvent.V2_CANCEL) this.#schedule();
  };

  #push(event: number, t: number): number {
    const i = this.#pending++;
    this.#qEvent[i] = event;
    this.#qT0[i] = t;
    if (!this.#published) this.#schedule();
    return i;
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(this.#later);
  }

  readonly #later = (): void => {
    this.#scheduled = false;
    this.#encodePending();
  };

  #encodePending(): void {
    for (let i = 0; i < this.#pending; i++) {
      const event = this.#qEvent[i]!;
      const t0 = microsAt(this.#qT0[i]!);
      if (event !== COMMAND) {
        this.#ringEvent(event, t0, i);
        continue;
      }
      const command = this.#qCmd[i]!;
      const response = this.#qRsp[i]!;
      this.#qCmd[i] = this.#qRsp[i] = null;
      if (this.#stream < 0) this.#open(t0);
      this.#tcp(t0, true, PSH | ACK, command, this.#seqGuest, this.#seqVtpm);
      this.#seqGuest = (this.#seqGuest + command.length) >>> 0;
      if (response) {
        this.#tcp(microsAt(this.#qT1[i]!), false, PSH | ACK, response, this.#seqVtpm, this.#seqGuest);
        this.#seqVtpm = (this.#seqVtpm + response.length) >>> 0;
      }
    }
    this.#pending = 0;
  }

  /** The RING record of queue entry `i`. */
  #ringEvent(event: number, ts: number, i: number): void {
    const toBackend = event === RingEvent.NOTIFY_IN || event === RingEvent.REQUEST || event === RingEvent.V2_SUBMIT || event === RingEvent.V2_CANCEL ? 1 : 0;
    const o = this.#event(ts, EventKind.RING, toBackend, 16);
    if (o < 0) return;
    const v = this.#w.view;
    v.setUint8(o, event);
    v.setUint8(o + 1, this.#qA[i]!);
    v.setUint16(o + 2, this.#qSeg[i]!);
    v.setUint32(o + 4, this.#qLen[i]!);
    v.setBigUint64(o + 8, this.#qId[i]!);
  }

  /** One xs_wire packet of this device's, as the backend sent ('out') or received ('in') it. */
  xenstore(dir: 'out' | 'in', packet: Uint8Array): void {
    this.#encodePending();
    const o = this.#event(nowMicros(), EventKind.XENSTORE, dir === 'in' ? 1 : 0, packet.length);
    if (o >= 0) this.#w.buf.set(packet, o);
  }

  /** One xs_wire packet on the guest's own connection to xenstored, stamped by xenstored (µs since the epoch). */
  guestXenstore(fromGuest: boolean, micros: number, packet: Uint8Array): void {
    this.#encodePending();
    const o = this.#event(micros, EventKind.GUEST_XENSTORE, fromGuest ? 1 : 0, packet.length);
    if (o >= 0) this.#w.buf.set(packet, o);
  }

  /** A line of text (a cut-off reason, the end of the capture). */
  note(text: string): void {
    this.#encodePending();
    const t = Buffer.from(text, 'utf8');
    const o = this.#event(nowMicros(), EventKind.NOTE, 0, t.length);
    if (o >= 0) t.copy(this.#w.buf, o);
  }

  /** The 8-byte record header of an event whose body is `bodyLen` bytes; returns where the body goes (-1: left out). */
  #event(ts: number, kind: number, toBackend: number, bodyLen: number): number {
    const o = this.#w.begin(1, ts, 8 + bodyLen);
    if (o < 0) return -1;
    const v = this.#w.view;
    v.setUint32(o, (1 << 24) | (kind << 16) | (toBackend << 8)); // version 1, kind, direction, 0
    v.setUint16(o + 4, this.#domid & 0xffff);
    v.setUint16(o + 6, this.#devid & 0xffff);
    return o + 8;
  }

  /** One TCP segment: the stream's header template, then its length, IP checksum, sequence numbers and flags. */
  #tcp(ts: number, fromGuest: boolean, flags: number, payload: Uint8Array | null, seq: number, ack: number): void {
    const len = payload?.length ?? 0;
    const o = this.#w.begin(0, ts, 40 + len);
    if (o < 0) return;
    const b = this.#w.buf;
    const v = this.#w.view;
    b.set(fromGuest ? this.#hdrGuest : this.#hdrVtpm, o);
    v.setUint16(o + 2, 40 + len);
    // The header's sum without the length was taken once per stream; one's complement adds the length in.
    let sum = (fromGuest ? this.#sumGuest : this.#sumVtpm) + 40 + len;
    sum = (sum & 0xffff) + (sum >>> 16);
    v.setUint16(o + 10, ~(sum + (sum >>> 16)) & 0xffff);
    v.setUint32(o + 24, seq >>> 0);
    v.setUint32(o + 28, ack >>> 0);
    v.setUint8(o + 33, flags);
    if (payload) b.set(payload, o + 40);
  }

  async close(): Promise<void> {
    this.#encodePending();
    if (this.#w.dropped > 0) this.#w.onFull = null;
    await this.#w.close();
  }
}

const SYN = 0x02;
const PSH = 0x08;
const ACK = 0x10;

/**
 * Fill the 40 bytes of `h` with an IPv4 + TCP header (length, checksum, sequence numbers and flags left zero;
 * TCP checksum zero) and return the one's-complement sum of its IPv4 half, folded to 16 bits.
 */
function headerTemplate(h: Uint8Array, src: number, dst: number, srcPort: number, dstPort: number): number {
  const v = new DataView(h.buffer, h.byteOffset, 40);
  h.fill(0);
  v.setUint8(0, 0x45);
  v.setUint8(8, 64); // TTL
  v.setUint8(9, 6); // TCP
  v.setUint32(12, src);
  v.setUint32(16, dst);
  v.setUint16(20, srcPort);
  v.setUint16(22, dstPort);
  v.setUint8(32, 5 << 4); // data offset: 20 bytes
  v.setUint16(34, 65535); // window
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += v.getUint16(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

/**
 * Routes the backend's xenstore packets to the capture of the device they concern: a request by the
 * path it names, its reply by its request id, a watch event by its path; and subscribes each capture
 * to its guest's own xenstore traffic at xenstored (its capture feed).
 */
export class XsCaptureRouter {
  readonly #byDomid = new Map<number, GuestCapture>();
  readonly #byReq = new Map<number, GuestCapture>();
  readonly #client: { tap: ((dir: 'out' | 'in', packet: Buffer) => void) | null };
  readonly #feed: CaptureFeedClient | null;

  /**
   * `client`'s tap is set only while some device captures (it costs a copy of every packet);
   * `xenstoredSocket` is where the guest's own traffic comes from (none without it).
   */
  constructor(client: { tap: ((dir: 'out' | 'in', packet: Buffer) => void) | null }, xenstoredSocket?: string, log: (line: string) => void = () => {}) {
    this.#client = client;
    this.#feed = xenstoredSocket ? new CaptureFeedClient(xenstoredSocket, log) : null;
  }

  /** Resolves once the guest's own xenstore traffic reaches `c` (or cannot). */
  add(domid: number, c: GuestCapture): Promise<void> {
    this.#byDomid.set(domid, c);
    this.#client.tap = this.tap;
    return this.#feed?.add(domid, (fromGuest, micros, packet) => c.guestXenstore(fromGuest, micros, packet)) ?? Promise.resolve();
  }

  remove(domid: number): void {
    const c = this.#byDomid.get(domid);
    this.#byDomid.delete(domid);
    this.#feed?.remove(domid);
    for (const [r, x] of this.#byReq) if (x === c) this.#byReq.delete(r);
    if (this.#byDomid.size === 0) this.#client.tap = null;
  }

  readonly tap = (dir: 'out' | 'in', packet: Buffer): void => {
    if (this.#byDomid.size === 0 || packet.length < 16) return;
    const type = packet.readUInt32LE(0);
    const reqId = packet.readUInt32LE(4);
    let c: GuestCapture | undefined;
    if (dir === 'in' && type !== WATCH_EVENT) {
      c = this.#byReq.get(reqId);
      this.#byReq.delete(reqId);
    } else {
      c = this.#forPath(packet.subarray(16));
      if (c && dir === 'out') this.#byReq.set(reqId, c);
    }
    c?.xenstore(dir, packet);
  };

  #forPath(payload: Buffer): GuestCapture | undefined {
    const end = payload.indexOf(0);
    const path = payload.toString('latin1', 0, end < 0 ? payload.length : end);
    const m = /^\/local\/domain\/(?:0\/backend\/vtpm\/([0-9]+)(?:\/|$)|([0-9]+)(?:\/|$))/.exec(path);
    if (!m) return undefined;
    const domid = Number(m[1] ?? m[2]);
    return domid === 0 ? undefined : this.#byDomid.get(domid);
  }
}

const WATCH_EVENT = 15;
