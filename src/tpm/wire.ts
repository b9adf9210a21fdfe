// TPM command/response framing shared by TPM 1.2 and 2.0: a 10-byte big-endian header
// {tag u16, size u32, ordinal-or-code u32}. The engine reads headers to route, to answer errors the way
// a real TPM does, and to spot failure mode; it never interprets command parameters.

export type TpmVersion = '2.0' | '1.2';

export const TPM_HEADER_SIZE = 10;

// TPM 2.0 (Part 2: Structures).
export const TPM2_ST_NO_SESSIONS = 0x8001;
export const TPM2_ST_SESSIONS = 0x8002;
export const TPM_RC_SUCCESS = 0x000;
export const TPM_RC_INITIALIZE = 0x100;
export const TPM_RC_FAILURE = 0x101;
export const TPM_RC_COMMAND_SIZE = 0x142;
export const TPM_RC_CANCELED = 0x909;

// TPM 1.2 (Part 2: Structures).
export const TPM_TAG_RQU_COMMAND = 0x00c1;
export const TPM_TAG_RSP_COMMAND = 0x00c4;
export const TPM_FAIL = 0x09;
export const TPM_BAD_PARAM_SIZE = 0x19;
export const TPM_FAILEDSELFTEST = 0x1c;
export const TPM_INVALID_POSTINIT = 0x26;

export interface TpmHeader {
  tag: number;
  size: number;
  /** Command code (2.0), ordinal (1.2) or, in a response, the response code. */
  code: number;
}

/** The header of a command or response, or null when fewer than 10 bytes are present. */
export function readHeader(bytes: Uint8Array): TpmHeader | null {
  if (bytes.length < TPM_HEADER_SIZE) return null;
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { tag: v.getUint16(0), size: v.getUint32(2), code: v.getUint32(6) };
}

/** The response code of a response (0 = success), or -1 when it is too short to carry one. */
export function responseCode(response: Uint8Array): number {
  // Byte arithmetic, no header object: every answered command's outcome is counted with it.
  if (response.length < TPM_HEADER_SIZE) return -1;
  return ((response[6]! << 24) | (response[7]! << 16) | (response[8]! << 8) | response[9]!) >>> 0;
}

/** Does this response say the TPM has entered failure mode? */
export function isFailureModeResponse(version: TpmVersion, response: Uint8Array): boolean {
  const rc = responseCode(response);
  return version === '2.0' ? rc === TPM_RC_FAILURE : rc === TPM_FAILEDSELFTEST;
}

/** Grows a big-endian byte string; used by the command builders. */
export class Marshal {
  #parts: number[] = [];

  u8(x: number): this {
    this.#parts.push(x & 0xff);
    return this;
  }

  u16(x: number): this {
    this.#parts.push((x >>> 8) & 0xff, x & 0xff);
    return this;
  }

  u32(x: number): this {
    this.#parts.push((x >>> 24) & 0xff, (x >>> 16) & 0xff, (x >>> 8) & 0xff, x & 0xff);
    return this;
  }

  bytes(b: ArrayLike<number>): this {
    for (let i = 0; i < b.length; i++) this.#parts.push(b[i]! & 0xff);
    return this;
  }

  /** TPM2B: u16 size then the bytes. */
  tpm2b(b: ArrayLike<number>): this {
    return this.u16(b.length).bytes(b);
  }

  get length(): number {
    return this.#parts.length;
  }

  toBytes(): Uint8Array {
    return Uint8Array.from(this.#parts);
  }
}

/** A whole command: tag, size (computed), code, then the body. */
export function command(tag: number, code: number, body: Marshal | Uint8Array = new Uint8Array(0)): Uint8Array {
  const b = body instanceof Marshal ? body.toBytes() : body;
  return new Marshal()
    .u16(tag)
    .u32(TPM_HEADER_SIZE + b.length)
    .u32(code)
    .bytes(b)
    .toBytes();
}
