// A guest's capture (`guest attach --pcap FILE`, `qemu attach --pcap FILE`; docs/observability.md):
// a pcapng file the backend writes with two interfaces.
//   0: LINKTYPE_RAW, IPv4/TCP. Each TPM command and response is one TCP segment of a stream between
//      the guest (10.H.L.2, port 49152+n) and its vTPM (10.H.L.1, port 2321, H.L = domid): Wireshark's
//      TPM 2.0 dissector decodes TCP port 2321, a request being the segment from the higher port.
//      A new connection of the device (a resume, a QEMU CMD_INIT) opens a new stream.
//   1: LINKTYPE_USER0, vtpm-split events (tools/wireshark/vtpm-split.lua): the device's xenstore
//      traffic as the backend sent and received it, and its ring events.
import { LINKTYPE_RAW, LINKTYPE_USER0, PcapngWriter, microsAt, nowMicros } from '../util/pcapng.js';

export const TPM_PORT = 2321;

/** Event kinds of the USER0 records (byte 1). */
export const EventKind = { XENSTORE: 1, RING: 2, NOTE: 3 } as const;
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

/** What the channels report for a capture (all numbers; the channel has already validated them). */
export interface RingTap {
  (event: number, fields?: { id?: bigint; status?: number; locality?: number; segments?: number; length?: number }): void;
}

export class GuestCapture {
  readonly #w: PcapngWriter;
  readonly #domid: number;
  readonly #devid: number;
  #stream = -1;
  #seqGuest = 0;
  #seqVtpm = 0;
  /** 10.H.L.2 (the guest) and 10.H.L.1 (its vTPM) as u32, H.L = domid. */
  readonly #guestIp: number;
  readonly #vtpmIp: number;

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

  /**
   * Work recorded on the guest's path (with its timestamp) and encoded just after, once per batch, so
   * a command's answer never waits for its capture.
   */
  readonly #later: Array<() => void> = [];
  readonly #drain = (): void => {
    const work = this.#later.splice(0);
    for (const f of work) f();
  };

  #defer(f: () => void): void {
    if (this.#later.push(f) === 1) setImmediate(this.#drain);
  }

  /** A new connection (a ring or page mapped, an endpoint initialised): a new TCP stream. */
  newStream(): void {
    const ts = nowMicros();
    this.#defer(() => this.#open(ts));
  }

  #open(ts: number): void {
    this.#stream++;
    this.#seqGuest = 1000;
    this.#seqVtpm = 5000;
    this.#tcp(ts, true, SYN, null, this.#seqGuest - 1, 0);
    this.#tcp(ts, false, SYN | ACK, null, this.#seqVtpm - 1, this.#seqGuest);
    this.#tcp(ts, true, ACK, null, this.#seqGuest, this.#seqVtpm);
  }

  /**
   * One command, stamped when it reached the vTPM (`t0`, performance.now()), and its response, stamped
   * now (null: the vTPM gave none; only the command is recorded).
   */
  command(command: Uint8Array, response: Uint8Array | null, t0: number): void {
    const ts = nowMicros();
    this.#defer(() => this.#command(command, response, microsAt(t0), ts));
  }

  #command(command: Uint8Array, response: Uint8Array | null, t0: number, ts: number): void {
    if (this.#stream < 0) this.#open(t0);
    this.#tcp(t0, true, PSH | ACK, command, this.#seqGuest, this.#seqVtpm);
    this.#seqGuest = (this.#seqGuest + command.length) >>> 0;
    if (response) {
      this.#tcp(ts, false, PSH | ACK, response, this.#seqVtpm, this.#seqGuest);
      this.#seqVtpm = (this.#seqVtpm + response.length) >>> 0;
    }
  }

  /** A ring event (see RingEvent). */
  readonly ring: RingTap = (event, f) => {
    const ts = nowMicros();
    this.#defer(() => this.#ring(ts, event, f));
  };

  #ring(ts: number, event: number, f: Parameters<RingTap>[1]): void {
    const o = this.#event(ts, EventKind.RING, event === RingEvent.NOTIFY_IN || event === RingEvent.REQUEST || event === RingEvent.V2_SUBMIT || event === RingEvent.V2_CANCEL ? 1 : 0, 16);
    if (o < 0) return;
    const b = this.#w.buf;
    b[o] = event;
    b[o + 1] = f?.status ?? f?.locality ?? 0;
    b.writeUInt16BE(f?.segments ?? 0, o + 2);
    b.writeUInt32BE(f?.length ?? 0, o + 4);
    b.writeBigUInt64BE(f?.id ?? 0n, o + 8);
  }

  /** One xs_wire packet of this device's, as the backend sent ('out') or received ('in') it. */
  xenstore(dir: 'out' | 'in', packet: Uint8Array): void {
    const ts = nowMicros();
    this.#defer(() => {
      const o = this.#event(ts, EventKind.XENSTORE, dir === 'in' ? 1 : 0, packet.length);
      if (o >= 0) this.#w.buf.set(packet, o);
    });
  }

  /** A line of text (a cut-off reason, the end of the capture). */
  note(text: string): void {
    const t = Buffer.from(text, 'utf8');
    const ts = nowMicros();
    this.#defer(() => {
      const o = this.#event(ts, EventKind.NOTE, 0, t.length);
      if (o >= 0) t.copy(this.#w.buf, o);
    });
  }

  /** The 8-byte record header of an event whose body is `bodyLen` bytes; returns where the body goes (-1: left out). */
  #event(ts: number, kind: number, toBackend: number, bodyLen: number): number {
    const o = this.#w.begin(1, ts, 8 + bodyLen);
    if (o < 0) return -1;
    const b = this.#w.buf;
    b[o] = 1; // version
    b[o + 1] = kind;
    b[o + 2] = toBackend;
    b[o + 3] = 0;
    b.writeUInt16BE(this.#domid & 0xffff, o + 4);
    b.writeUInt16BE(this.#devid & 0xffff, o + 6);
    return o + 8;
  }

  #tcp(ts: number, fromGuest: boolean, flags: number, payload: Uint8Array | null, seq: number, ack: number): void {
    const len = payload?.length ?? 0;
    const o = this.#w.begin(0, ts, 40 + len);
    if (o < 0) return;
    const b = this.#w.buf;
    b.fill(0, o, o + 40);
    b[o] = 0x45;
    b.writeUInt16BE(40 + len, o + 2);
    b[o + 8] = 64; // TTL
    b[o + 9] = 6; // TCP
    b.writeUInt32BE(fromGuest ? this.#guestIp : this.#vtpmIp, o + 12);
    b.writeUInt32BE(fromGuest ? this.#vtpmIp : this.#guestIp, o + 16);
    b.writeUInt16BE(ipChecksum(b, o), o + 10);
    const guestPort = 49152 + (this.#stream % 16384);
    b.writeUInt16BE(fromGuest ? guestPort : TPM_PORT, o + 20);
    b.writeUInt16BE(fromGuest ? TPM_PORT : guestPort, o + 22);
    b.writeUInt32BE(seq >>> 0, o + 24);
    b.writeUInt32BE(ack >>> 0, o + 28);
    b[o + 32] = 5 << 4; // data offset: 20 bytes
    b[o + 33] = flags;
    b.writeUInt16BE(65535, o + 34); // window
    if (payload) b.set(payload, o + 40);
  }

  async close(): Promise<void> {
    this.#drain();
    if (this.#w.dropped > 0) this.#w.onFull = null;
    await this.#w.close();
  }
}

const SYN = 0x02;
const PSH = 0x08;
const ACK = 0x10;

/** The IPv4 header checksum of the 20 bytes at `o` (its checksum field zero). */
function ipChecksum(h: Uint8Array, o: number): number {
  let sum = 0;
  for (let i = o; i < o + 20; i += 2) sum += (h[i]! << 8) | h[i + 1]!;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/**
 * Routes the backend's xenstore packets to the capture of the device they concern: a request by the
 * path it names, its reply by its request id, a watch event by its path.
 */
export class XsCaptureRouter {
  readonly #byDomid = new Map<number, GuestCapture>();
  readonly #byReq = new Map<number, GuestCapture>();
  readonly #client: { tap: ((dir: 'out' | 'in', packet: Buffer) => void) | null };

  /** `client`'s tap is set only while some device captures (it costs a copy of every packet). */
  constructor(client: { tap: ((dir: 'out' | 'in', packet: Buffer) => void) | null }) {
    this.#client = client;
  }

  add(domid: number, c: GuestCapture): void {
    this.#byDomid.set(domid, c);
    this.#client.tap = this.tap;
  }

  remove(domid: number): void {
    const c = this.#byDomid.get(domid);
    this.#byDomid.delete(domid);
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
