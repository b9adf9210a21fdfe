// xs_wire: the XenStore message codec (xen/include/public/io/xs_wire.h). A message is a 16-byte
// little-endian header {type, req_id, tx_id, len} followed by `len` payload bytes, len ≤ 4096 in both
// directions. Payloads are NUL-terminated strings, except READ replies and WRITE values (raw bytes).
// The receiver is an explicit state machine (GET_HEADER → GET_PAYLOAD) like ws's receiver: it checks
// the length limit before allocating and raises one precise error on a violation.

/** Message types, numbered as in xs_wire.h's `enum xsd_sockmsg_type`. */
export enum XsType {
  CONTROL = 0,
  DIRECTORY = 1,
  READ = 2,
  GET_PERMS = 3,
  WATCH = 4,
  UNWATCH = 5,
  TRANSACTION_START = 6,
  TRANSACTION_END = 7,
  INTRODUCE = 8,
  RELEASE = 9,
  GET_DOMAIN_PATH = 10,
  WRITE = 11,
  MKDIR = 12,
  RM = 13,
  SET_PERMS = 14,
  WATCH_EVENT = 15,
  ERROR = 16,
  IS_DOMAIN_INTRODUCED = 17,
  RESUME = 18,
  SET_TARGET = 19,
  RESET_WATCHES = 21,
  DIRECTORY_PART = 22,
  GET_FEATURE = 23,
  SET_FEATURE = 24,
  GET_QUOTA = 25,
  SET_QUOTA = 26,
}

export const HEADER_SIZE = 16;
/** XENSTORE_PAYLOAD_MAX: the largest payload either side may send. */
export const PAYLOAD_MAX = 4096;
/** XENSTORE_ABS_PATH_MAX / XENSTORE_REL_PATH_MAX. */
export const ABS_PATH_MAX = 3072;
export const REL_PATH_MAX = 2048;

/** Error names in xs_wire.h's xsd_errors[] order; an XS_ERROR reply carries one of them + NUL. */
export const XS_ERRORS = [
  'EINVAL',
  'EACCES',
  'EEXIST',
  'EISDIR',
  'ENOENT',
  'ENOMEM',
  'ENOSPC',
  'EIO',
  'ENOTEMPTY',
  'ENOSYS',
  'EROFS',
  'EBUSY',
  'EAGAIN',
  'EISCONN',
  'E2BIG',
  'EPERM',
] as const;
export type XsErrno = (typeof XS_ERRORS)[number];

export function isXsErrno(s: string): s is XsErrno {
  return (XS_ERRORS as readonly string[]).includes(s);
}

/** An operation the peer refused: `code` is the xs_wire error name (EACCES, EAGAIN, …). */
export class XsError extends Error {
  constructor(
    readonly code: XsErrno,
    message?: string,
  ) {
    super(message ?? code);
    this.name = 'XsError';
  }
}

export type XsWireErrorCode = 'XS_PAYLOAD_TOO_LONG';

/** A framing violation: the connection cannot continue (the offender is named in the message). */
export class XsWireError extends Error {
  constructor(
    readonly code: XsWireErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'XsWireError';
  }
}

export interface XsHeader {
  type: number;
  reqId: number;
  txId: number;
  len: number;
}

export interface XsMessage {
  type: number;
  reqId: number;
  txId: number;
  payload: Buffer;
}

/** One complete frame: header + payload. Throws when the payload exceeds PAYLOAD_MAX. */
export function encodeMessage(type: number, reqId: number, txId: number, payload: Buffer): Buffer {
  if (payload.length > PAYLOAD_MAX) {
    throw new XsWireError('XS_PAYLOAD_TOO_LONG', `payload of ${payload.length} bytes exceeds ${PAYLOAD_MAX}`);
  }
  const out = Buffer.allocUnsafe(HEADER_SIZE + payload.length);
  out.writeUInt32LE(type >>> 0, 0);
  out.writeUInt32LE(reqId >>> 0, 4);
  out.writeUInt32LE(txId >>> 0, 8);
  out.writeUInt32LE(payload.length, 12);
  payload.copy(out, HEADER_SIZE);
  return out;
}

export function decodeHeader(buf: Buffer, offset = 0): XsHeader {
  return {
    type: buf.readUInt32LE(offset),
    reqId: buf.readUInt32LE(offset + 4),
    txId: buf.readUInt32LE(offset + 8),
    len: buf.readUInt32LE(offset + 12),
  };
}

/** Strings each followed by NUL: `a|b|` (the form of most payloads). */
export function encodeStrings(...parts: string[]): Buffer {
  return Buffer.from(parts.map((p) => p + '\0').join(''), 'latin1');
}

/** `path|` + raw value: the WRITE request payload (the value has no NUL terminator). */
export function encodeWrite(path: string, value: Buffer | string): Buffer {
  const v = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  return Buffer.concat([Buffer.from(path + '\0', 'latin1'), v]);
}

/**
 * Split a payload of NUL-terminated strings. Returns undefined when the payload does not end with a
 * NUL (a protocol violation: xenstored answers EINVAL). An empty payload is zero strings.
 */
export function splitStrings(payload: Buffer): string[] | undefined {
  if (payload.length === 0) return [];
  if (payload[payload.length - 1] !== 0) return undefined;
  return payload.toString('latin1', 0, payload.length - 1).split('\0');
}

/** Parse `path|value` (WRITE): undefined when there is no NUL after the path. */
export function splitWrite(payload: Buffer): { path: string; value: Buffer } | undefined {
  const nul = payload.indexOf(0);
  if (nul < 0) return undefined;
  return { path: payload.toString('latin1', 0, nul), value: payload.subarray(nul + 1) };
}

/** The WATCH_EVENT payload `path|token|`. */
export function encodeWatchEvent(path: string, token: string): Buffer {
  return encodeMessage(XsType.WATCH_EVENT, 0, 0, encodeStrings(path, token));
}

const GET_HEADER = 0;
const GET_PAYLOAD = 1;

/**
 * Incremental frame parser. Feed bytes with `push`; each complete frame is handed to `onMessage`.
 * A header announcing more than `maxPayload` bytes throws XsWireError before anything is allocated,
 * and the receiver stays failed (the caller closes the connection).
 */
export class XsReceiver {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private state = GET_HEADER;
  private header: XsHeader = { type: 0, reqId: 0, txId: 0, len: 0 };
  private failed: XsWireError | undefined;

  constructor(
    private readonly onMessage: (msg: XsMessage) => void,
    private readonly maxPayload = PAYLOAD_MAX,
  ) {}

  /** Bytes received but not yet part of a complete frame. */
  get pendingBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    for (;;) {
      if (this.state === GET_HEADER) {
        if (!this.getHeader()) return;
      } else if (!this.getPayload()) return;
    }
  }

  private getHeader(): boolean {
    if (this.buffered < HEADER_SIZE) return false;
    const h = decodeHeader(this.consume(HEADER_SIZE));
    if (h.len > this.maxPayload) {
      this.failed = new XsWireError(
        'XS_PAYLOAD_TOO_LONG',
        `frame type ${h.type} req ${h.reqId} announces ${h.len} payload bytes, limit ${this.maxPayload}`,
      );
      throw this.failed;
    }
    this.header = h;
    this.state = GET_PAYLOAD;
    return true;
  }

  private getPayload(): boolean {
    const h = this.header;
    if (this.buffered < h.len) return false;
    const payload = h.len === 0 ? Buffer.alloc(0) : this.consume(h.len);
    this.state = GET_HEADER;
    this.onMessage({ type: h.type, reqId: h.reqId, txId: h.txId, payload });
    return true;
  }

  /** Take n bytes off the front of the buffered chunks (copying only when a frame spans chunks). */
  private consume(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0]!;
    if (n === first.length) return this.chunks.shift()!;
    if (n < first.length) {
      this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length, n - off);
      c.copy(out, off, 0, take);
      off += take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
    return out;
  }
}

/** Type name for messages and logs ("READ", or "type 99" for unknown numbers). */
export function typeName(type: number): string {
  return XsType[type] ?? `type ${type}`;
}
