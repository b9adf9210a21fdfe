// The Xen 3.x vTPM manager framing (docs/manager.md), shared by every FIFO of the manager:
//   instance u32 | tag u16 | size u32 | ordinal-or-status u32 | params
// all big-endian; `size` counts tag..params (10 + params) but not the 4-byte instance prefix.
// The decoder is an explicit state machine fed arbitrary chunks; limits are checked before allocating.

export const PREFIX_SIZE = 4;
/** tag + size + ordinal: what `size` counts besides the parameters (Xen's VTPM_COMMAND_HEADER_SIZE_CLT). */
export const CLT_HEADER_SIZE = 10;
/** prefix + CLT header (Xen's VTPM_COMMAND_HEADER_SIZE_SRV). */
export const SRV_HEADER_SIZE = PREFIX_SIZE + CLT_HEADER_SIZE;
/** A FIFO write is atomic only up to this; frames on FIFOs with several writers must not exceed it. */
export const PIPE_BUF = 4096;
/** Largest parameter block accepted: libtpms state blobs are well under this. */
export const MAX_PARAMS = 8 * 1024 * 1024;

export const TAG_REQ = 0x01c1;
/** Xen's VTPM_TAG_RSP: its manager never sent it on a FIFO (replies echo the request's tag, 0x01C1); accepted from older peers. */
export const TAG_RSP = 0x01c4;
/** TPM 1.2 command tags: Xen forwarded these to the DMI; we recognise them only to answer TPM_FAIL. */
export const TPM_TAGS: readonly number[] = [0x00c1, 0x00c2, 0x00c3, 0x8001, 0x8002];
/** Tags a reply may carry: the request's, echoed as Xen's manager did; TAG_RSP from older managers of ours. */
export const REPLY_TAGS: readonly number[] = [TAG_REQ, TAG_RSP, ...TPM_TAGS];

export const PRIV_MASK = 0x01000000;

export const Ord = {
  SAVENVM: 1,
  LOADNVM: 2,
  TPMCOMMAND: 3,
  GET_MIG_KEY: 4,
  LOAD_MIG_KEY: 5,
  // Ours (Xen 3.x stops at 5): the other two libtpms blobs, so suspend can park a vTPM at the manager.
  SAVE_VOLATILE: 6,
  LOAD_VOLATILE: 7,
  SAVE_SAVESTATE: 8,
  LOAD_SAVESTATE: 9,
  /** params: kind u8 (0 permanent, 1 volatile, 2 savestate). */
  DELETE_STATE: 10,
  /**
   * Ours: a volatile checkpoint acknowledged once the manager holds it in memory (docs/manager.md);
   * made durable in the background, at CLOSE and at shutdown. params: blob.
   */
  HOLD_VOLATILE: 11,
  /** Ours: bytes appended to the held volatile checkpoint (refused when none is held). params: bytes. */
  APPEND_VOLATILE: 12,
  OPEN: 0x01000001,
  CLOSE: 0x01000002,
  DELETE: 0x01000003,
  MIGRATE_IN: 0x01000004,
  MIGRATE_OUT: 0x01000005,
  /** Ours, only valid on rendezvous.fifo: asks the manager to attach a client FIFO pair. */
  CONNECT: 0x00000100,
} as const;

/**
 * Reply statuses: TPM 1.2 result codes (Xen's tcg.h), which is what Xen's manager handlers returned;
 * Xen's VTPM_* codes in vtpm_manager.h were never put on the wire. docs/manager.md has the table of
 * which situation answers which code, Xen's and ours.
 */
export const Status = {
  SUCCESS: 0,
  /** Ours: a well-formed request this caller or this VM may not make (policy), e.g. another instance than its bound one. */
  AUTHFAIL: 1,
  BAD_PARAMETER: 3,
  FAIL: 9,
  BAD_ORDINAL: 10,
  RESOURCES: 0x15,
  /** Xen: LOADNVM with nothing stored. Ours the same for every LOAD ordinal ("never stored"); store I/O failures answer FAIL. */
  IOERROR: 0x1f,
  /** Ours: sealed state or a migration blob failed authentication or was made for another key. */
  DECRYPT_ERROR: 0x21,
} as const;
export type StatusCode = (typeof Status)[keyof typeof Status];

export const STATUS_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Status).map(([k, v]) => [v, `TPM_${k}`]),
);

const ORD_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Ord).map(([k, v]) => [v, k]));
export function ordinalName(ord: number): string {
  return ORD_NAMES[ord] ?? `0x${ord.toString(16).padStart(8, '0')}`;
}

export function isPrivileged(ord: number): boolean {
  return (ord & PRIV_MASK) !== 0;
}

/** One protocol violation; `status` is what the peer is answered with. */
export class WireError extends Error {
  constructor(
    readonly code: 'BAD_TAG' | 'BAD_SIZE' | 'TOO_LARGE' | 'BAD_PARAMS' | 'TRUNCATED',
    message: string,
    readonly status: StatusCode = Status.BAD_PARAMETER,
    /** The instance prefix of the offending frame, when it was read. */
    readonly instance?: number,
  ) {
    super(message);
    this.name = 'WireError';
  }
}

export interface Frame {
  instance: number;
  tag: number;
  /** The ordinal of a request, the status of a response. */
  code: number;
  params: Uint8Array;
}

export function encodeFrame(instance: number, tag: number, code: number, params: Uint8Array = new Uint8Array(0)): Buffer {
  if (params.length > MAX_PARAMS) throw new WireError('TOO_LARGE', `params of ${params.length} bytes exceed ${MAX_PARAMS}`);
  const out = Buffer.allocUnsafe(SRV_HEADER_SIZE + params.length);
  out.writeUInt32BE(instance >>> 0, 0);
  out.writeUInt16BE(tag, 4);
  out.writeUInt32BE(CLT_HEADER_SIZE + params.length, 6);
  out.writeUInt32BE(code >>> 0, 10);
  out.set(params, SRV_HEADER_SIZE);
  return out;
}

export function encodeRequest(instance: number, ordinal: number, params?: Uint8Array): Buffer {
  return encodeFrame(instance, TAG_REQ, ordinal, params);
}

/** A reply carries the request's tag, as Xen's manager packed it (vtpm_manager_handler.c). */
export function encodeResponse(instance: number, status: number, params?: Uint8Array, tag: number = TAG_REQ): Buffer {
  return encodeFrame(instance, tag, status, params);
}

const GET_HEADER = 0;
const GET_PARAMS = 1;
const FAILED = 2;

/**
 * Incremental frame decoder. `accept` lists the tags that may start a frame (requests on the manager's
 * side, responses on a client's). After a framing error the stream cannot be re-synchronised (no frame
 * marker), so the decoder stays failed and the owner drops the channel.
 */
export class FrameDecoder {
  #state = GET_HEADER;
  #header = Buffer.alloc(SRV_HEADER_SIZE);
  #have = 0;
  #frame: Frame | null = null;
  #params: Buffer | null = null;

  constructor(
    private readonly accept: readonly number[],
    private readonly maxParams = MAX_PARAMS,
  ) {}

  get failed(): boolean {
    return this.#state === FAILED;
  }

  /** True when no partial frame is buffered (a clean place for the stream to end). */
  get idle(): boolean {
    return this.#state === GET_HEADER && this.#have === 0;
  }

  /** The partial frame buffered now, for a log line: its header bytes in hex and how much of it came. */
  describePartial(): string {
    if (this.#state === GET_PARAMS) {
      const want = this.#params!.length;
      return `${this.#header.toString('hex')} with ${this.#have} of ${want} parameter bytes`;
    }
    return `${this.#header.subarray(0, this.#have).toString('hex')}, ${this.#have} of ${SRV_HEADER_SIZE} header bytes`;
  }

  /** Feeds bytes; returns the frames they complete. Throws WireError on the first violation. */
  push(chunk: Uint8Array): Frame[] {
    if (this.#state === FAILED) throw new WireError('BAD_SIZE', 'decoder already failed');
    const out: Frame[] = [];
    let off = 0;
    while (off < chunk.length) {
      if (this.#state === GET_HEADER) off = this.#getHeader(chunk, off, out);
      else off = this.#getParams(chunk, off, out);
    }
    return out;
  }

  #getHeader(chunk: Uint8Array, off: number, out: Frame[]): number {
    const n = Math.min(SRV_HEADER_SIZE - this.#have, chunk.length - off);
    this.#header.set(chunk.subarray(off, off + n), this.#have);
    this.#have += n;
    off += n;
    if (this.#have < SRV_HEADER_SIZE) return off;
    const h = this.#header;
    const instance = h.readUInt32BE(0);
    const tag = h.readUInt16BE(4);
    const size = h.readUInt32BE(6);
    const code = h.readUInt32BE(10);
    if (!this.accept.includes(tag)) {
      this.#state = FAILED;
      throw new WireError('BAD_TAG', `invalid tag 0x${tag.toString(16).padStart(4, '0')}`, Status.BAD_PARAMETER, instance);
    }
    if (size < CLT_HEADER_SIZE) {
      this.#state = FAILED;
      throw new WireError('BAD_SIZE', `size ${size} is smaller than the ${CLT_HEADER_SIZE}-byte header`, Status.BAD_PARAMETER, instance);
    }
    const plen = size - CLT_HEADER_SIZE;
    if (plen > this.maxParams) {
      this.#state = FAILED;
      throw new WireError('TOO_LARGE', `size ${size} exceeds the limit of ${this.maxParams + CLT_HEADER_SIZE}`, Status.BAD_PARAMETER, instance);
    }
    this.#have = 0;
    this.#frame = { instance, tag, code, params: new Uint8Array(0) };
    if (plen === 0) {
      out.push(this.#frame);
      this.#frame = null;
      return off;
    }
    this.#params = Buffer.allocUnsafe(plen);
    this.#state = GET_PARAMS;
    return off;
  }

  #getParams(chunk: Uint8Array, off: number, out: Frame[]): number {
    const params = this.#params!;
    const n = Math.min(params.length - this.#have, chunk.length - off);
    params.set(chunk.subarray(off, off + n), this.#have);
    this.#have += n;
    off += n;
    if (this.#have === params.length) {
      out.push({ ...this.#frame!, params });
      this.#frame = null;
      this.#params = null;
      this.#have = 0;
      this.#state = GET_HEADER;
    }
    return off;
  }
}

/**
 * Frames out of one read of a FIFO with several writers. Each legitimate writer puts a whole frame of at
 * most PIPE_BUF bytes into one write, which the kernel keeps whole and unmixed, and one read returns
 * whole writes; so here a frame must lie entirely inside the read. Bytes that do not start such a frame
 * (garbage, a half frame, a header promising more than the read holds) are skipped one at a time until
 * a frame starts again: a garbage writer costs only its own bytes, never the frames after it. Returns the
 * frames and, when anything was skipped, one error naming the first problem and the skipped bytes.
 */
export function splitSharedRead(chunk: Uint8Array, accept: readonly number[], maxParams: number): { frames: Frame[]; error: WireError | null } {
  const b = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
  const frames: Frame[] = [];
  let first: WireError | null = null;
  let skipFrom = -1;
  let skipped = 0;
  let off = 0;
  while (off < b.length) {
    const end = sharedFrameEnd(b, off, accept, maxParams);
    if (end > 0) {
      frames.push({ instance: b.readUInt32BE(off), tag: b.readUInt16BE(off + 4), code: b.readUInt32BE(off + 10), params: Buffer.from(b.subarray(off + SRV_HEADER_SIZE, end)) });
      off = end;
      continue;
    }
    // Only the first problem is described: a read full of garbage must not cost an Error per byte.
    if (skipFrom < 0) {
      skipFrom = off;
      first = notAFrame(b, off, accept, maxParams);
    }
    skipped++;
    off++;
  }
  if (!first) return { frames, error: null };
  const shown = b.subarray(skipFrom, skipFrom + Math.min(skipped, 16)).toString('hex');
  return { frames, error: new WireError(first.code, `${first.message}; ${skipped} bytes skipped (${shown}${skipped > 16 ? '…' : ''})`, first.status, first.instance) };
}

/** The end offset of a whole frame starting at `off`, or -1. */
function sharedFrameEnd(b: Buffer, off: number, accept: readonly number[], maxParams: number): number {
  if (b.length - off < SRV_HEADER_SIZE || !accept.includes(b.readUInt16BE(off + 4))) return -1;
  const size = b.readUInt32BE(off + 6);
  if (size < CLT_HEADER_SIZE || size - CLT_HEADER_SIZE > maxParams || PREFIX_SIZE + size > b.length - off) return -1;
  return off + PREFIX_SIZE + size;
}

/** Why no frame starts at `off` (sharedFrameEnd said -1). */
function notAFrame(b: Buffer, off: number, accept: readonly number[], maxParams: number): WireError {
  const left = b.length - off;
  if (left < SRV_HEADER_SIZE) return new WireError('TRUNCATED', `half frame: ${left} bytes, less than a ${SRV_HEADER_SIZE}-byte header`);
  const instance = b.readUInt32BE(off);
  const tag = b.readUInt16BE(off + 4);
  const size = b.readUInt32BE(off + 6);
  if (!accept.includes(tag)) return new WireError('BAD_TAG', `invalid tag 0x${tag.toString(16).padStart(4, '0')}`, Status.BAD_PARAMETER, instance);
  if (size < CLT_HEADER_SIZE) return new WireError('BAD_SIZE', `size ${size} is smaller than the ${CLT_HEADER_SIZE}-byte header`, Status.BAD_PARAMETER, instance);
  if (size - CLT_HEADER_SIZE > maxParams)
    return new WireError('TOO_LARGE', `size ${size} exceeds the limit of ${maxParams + CLT_HEADER_SIZE} for a FIFO with several writers`, Status.BAD_PARAMETER, instance);
  return new WireError('TRUNCATED', `half frame: its header promises ${PREFIX_SIZE + size} bytes, the write held ${left}`, Status.BAD_PARAMETER, instance);
}

// ---- parameter blocks -------------------------------------------------------------------------

export const TPM_VERSIONS = { '1.2': 1, '2.0': 2 } as const;
export type TpmVersion = keyof typeof TPM_VERSIONS;

export const KIND_CODES = { permanent: 0, volatile: 1, savestate: 2 } as const;

/** The ordinals that save and load each kind of state blob. */
export const SAVE_ORD = { permanent: Ord.SAVENVM, volatile: Ord.SAVE_VOLATILE, savestate: Ord.SAVE_SAVESTATE } as const;
export const LOAD_ORD = { permanent: Ord.LOADNVM, volatile: Ord.LOAD_VOLATILE, savestate: Ord.LOAD_SAVESTATE } as const;

/** Startup modes of Xen's OPEN (TPM_ST_*). */
export const Startup = { CLEAR: 1, SAVE: 2, DEACTIVATED: 3 } as const;

/**
 * OPEN parameters. Xen 3.x sends 7 bytes (mig type, startup mode, vm type, instance); we append the
 * VM's uuid (16 bytes) and TPM version (u8: 1 = 1.2, 2 = 2.0). A 7-byte OPEN (a Xen hotplug script)
 * names an existing instance or a new TPM 1.2 one with a uuid derived from the instance number.
 * A 25th byte chooses the EK certificates a new VM's TPM is manufactured with (EK_CODES; absent or 0:
 * the manager's default); a VM that exists keeps what it was made with.
 */
export interface OpenParams {
  migType: number;
  startup: number;
  vmType: number;
  /** 0 = let the manager choose (new VM) or look it up (known uuid). */
  instance: number;
  vmUuid: string | null;
  version: TpmVersion | null;
  /** EK certificates at manufacture; absent: the manager's default. */
  ek?: EkCode;
}

export const EK_CODES = { rsa: 1, ecc: 2, both: 3, none: 4 } as const;
export type EkCode = keyof typeof EK_CODES;

export const OPEN_XEN_SIZE = 7;
export const OPEN_SIZE = 7 + 16 + 1;
export const OPEN_EK_SIZE = OPEN_SIZE + 1;

export function encodeOpen(p: OpenParams): Buffer {
  const b = Buffer.alloc(p.vmUuid === null ? OPEN_XEN_SIZE : p.ek === undefined ? OPEN_SIZE : OPEN_EK_SIZE);
  b.writeUInt8(p.migType, 0);
  b.writeUInt8(p.startup, 1);
  b.writeUInt8(p.vmType, 2);
  b.writeUInt32BE(p.instance >>> 0, 3);
  if (p.vmUuid !== null) {
    uuidToBytes(p.vmUuid).copy(b, 7);
    b.writeUInt8(TPM_VERSIONS[p.version ?? '2.0'], 23);
    if (p.ek !== undefined) b.writeUInt8(EK_CODES[p.ek], 24);
  }
  return b;
}

export function decodeOpen(params: Uint8Array): OpenParams {
  const b = Buffer.from(params.buffer, params.byteOffset, params.length);
  if (b.length !== OPEN_XEN_SIZE && b.length !== OPEN_SIZE && b.length !== OPEN_EK_SIZE)
    throw new WireError('BAD_PARAMS', `OPEN takes ${OPEN_XEN_SIZE}, ${OPEN_SIZE} or ${OPEN_EK_SIZE} parameter bytes, got ${b.length}`);
  const base = { migType: b[0]!, startup: b[1]!, vmType: b[2]!, instance: b.readUInt32BE(3) };
  if (b.length === OPEN_XEN_SIZE) return { ...base, vmUuid: null, version: null };
  const v = b[23]!;
  const version = (Object.keys(TPM_VERSIONS) as TpmVersion[]).find((k) => TPM_VERSIONS[k] === v);
  if (!version) throw new WireError('BAD_PARAMS', `unknown TPM version code ${v}`);
  const out: OpenParams = { ...base, vmUuid: bytesToUuid(b.subarray(7, 23)), version };
  if (b.length === OPEN_EK_SIZE && b[24] !== 0) {
    const ek = (Object.keys(EK_CODES) as EkCode[]).find((k) => EK_CODES[k] === b[24]);
    if (!ek) throw new WireError('BAD_PARAMS', `unknown EK certificate code ${b[24]} (1 rsa, 2 ecc, 3 both, 4 none)`);
    out.ek = ek;
  }
  return out;
}

/** Our 24-byte OPEN's response parameters: instance u32, created u8. A 7-byte (Xen) OPEN gets none, as from Xen. */
export function encodeOpenResult(instance: number, created: boolean): Buffer {
  const b = Buffer.alloc(5);
  b.writeUInt32BE(instance >>> 0, 0);
  b.writeUInt8(created ? 1 : 0, 4);
  return b;
}

export function decodeOpenResult(params: Uint8Array): { instance: number; created: boolean } {
  if (params.length !== 5) throw new WireError('BAD_PARAMS', `OPEN response has ${params.length} parameter bytes, expected 5`);
  const b = Buffer.from(params.buffer, params.byteOffset, params.length);
  return { instance: b.readUInt32BE(0), created: b[4] === 1 };
}

/** CLOSE and DELETE: instance u32, as in Xen. */
export function encodeInstanceParam(instance: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(instance >>> 0, 0);
  return b;
}

export function decodeInstanceParam(params: Uint8Array, what: string): number {
  if (params.length !== 4) throw new WireError('BAD_PARAMS', `${what} takes a 4-byte instance, got ${params.length} bytes`);
  return Buffer.from(params.buffer, params.byteOffset, 4).readUInt32BE(0);
}

/** CONNECT (rendezvous): bound instance u32 (0xffffffff = any), pid u32, name length u8, name. */
export const ANY_INSTANCE = 0xffffffff;
const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;

export interface ConnectParams {
  bind: number;
  pid: number;
  name: string;
}

export function encodeConnect(p: ConnectParams): Buffer {
  if (!NAME_RE.test(p.name)) throw new WireError('BAD_PARAMS', `bad client name "${p.name}"`);
  const name = Buffer.from(p.name, 'ascii');
  const b = Buffer.alloc(9 + name.length);
  b.writeUInt32BE(p.bind >>> 0, 0);
  b.writeUInt32BE(p.pid >>> 0, 4);
  b.writeUInt8(name.length, 8);
  name.copy(b, 9);
  return b;
}

export function decodeConnect(params: Uint8Array): ConnectParams {
  const b = Buffer.from(params.buffer, params.byteOffset, params.length);
  if (b.length < 10 || b.length !== 9 + b[8]!) throw new WireError('BAD_PARAMS', `malformed CONNECT of ${b.length} bytes`);
  const name = b.subarray(9).toString('latin1');
  if (!NAME_RE.test(name)) throw new WireError('BAD_PARAMS', `bad client name ${JSON.stringify(name)}`);
  return { bind: b.readUInt32BE(0), pid: b.readUInt32BE(4), name };
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function isUuid(s: string): boolean {
  return UUID_RE.test(s);
}

export function uuidToBytes(uuid: string): Buffer {
  const u = uuid.toLowerCase();
  if (!UUID_RE.test(u)) throw new WireError('BAD_PARAMS', `not a uuid: ${JSON.stringify(uuid)}`);
  return Buffer.from(u.replace(/-/g, ''), 'hex');
}

export function bytesToUuid(b: Uint8Array): string {
  const h = Buffer.from(b).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}
