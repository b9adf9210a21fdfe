// The data port of the TCTI bridge: raw TPM commands in, raw responses out, no extra framing
// (docs/protocols/swtpm-ctrl.md). The tpm2-tss swtpm TCTI opens one connection per command, writes the
// whole command and reads a 10-byte header then size-10 bytes; persistent clients may send several
// commands on one connection. Unlike swtpm, which takes one read() as one command, this receiver
// reassembles each command from its header's size, so a command may arrive in pieces.

/** TPM2 command header: tag u16, commandSize u32, commandCode u32. */
export const TPM_HEADER_SIZE = 10;
/** Bytes needed to learn a command's size: tag + commandSize. */
const SIZE_PREFIX = 6;
/** The tpmif v2 shared page carries at most 4096 bytes (8 + 4088 with the header, docs/protocols/tpmif.md). */
export const DEFAULT_MAX_COMMAND_SIZE = 4096;

export const TPM_ST_NO_SESSIONS = 0x8001;
export const TPM_RC_COMMAND_SIZE = 0x142;
export const TPM_RC_FAILURE = 0x101;

/** A bare TPM2 error response: tag 0x8001, size 10, the response code. */
export function tpm2ErrorResponse(rc: number): Uint8Array {
  const b = new Uint8Array(TPM_HEADER_SIZE);
  const v = new DataView(b.buffer);
  v.setUint16(0, TPM_ST_NO_SESSIONS);
  v.setUint32(2, TPM_HEADER_SIZE);
  v.setUint32(6, rc >>> 0);
  return b;
}

export type DataErrorCode = 'CMD_TOO_LARGE' | 'CMD_TOO_SMALL' | 'CMD_TRUNCATED' | 'TRANSMIT_FAILED';

export class DataError extends Error {
  constructor(
    readonly code: DataErrorCode,
    readonly peer: string,
    message: string,
  ) {
    super(`${peer}: ${message}`);
    this.name = 'DataError';
  }
}

export function checkMaxCommandSize(n: number): void {
  if (!Number.isInteger(n) || n < TPM_HEADER_SIZE || n > 0xffffffff) {
    throw new RangeError(`maxCommandSize must be an integer in ${TPM_HEADER_SIZE}..2^32-1, got ${n}`);
  }
}

/** What the receiver found next in the byte stream. */
export type DataFrame =
  | { kind: 'command'; bytes: Uint8Array }
  /** commandSize above the limit: answer TPM_RC_COMMAND_SIZE; its bytes are skipped unread. */
  | { kind: 'too-large'; size: number }
  /** commandSize below a header: answer TPM_RC_COMMAND_SIZE; the stream cannot be resynchronised. */
  | { kind: 'too-small'; size: number };

const GET_SIZE = 0; // collecting tag + commandSize
const GET_COMMAND = 1; // collecting the rest of a command of known size
const DISCARD = 2; // skipping the body of a rejected oversize command
const DEAD = 3; // framing lost; nothing more is read

/**
 * Splits a data-port byte stream into TPM commands. push() stores bytes, next() returns the next
 * frame or null when bytes run out. Sizes are checked before anything is allocated.
 */
export class CommandReceiver {
  #state = GET_SIZE;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #size = 0;
  #skip = 0;

  constructor(readonly maxCommandSize: number = DEFAULT_MAX_COMMAND_SIZE) {
    checkMaxCommandSize(maxCommandSize);
  }

  /** Bytes held that belong to a command not yet complete (0 between commands). */
  get partial(): number {
    return this.#state === DISCARD ? this.#skip : this.#buffered;
  }

  get dead(): boolean {
    return this.#state === DEAD;
  }

  push(chunk: Uint8Array): void {
    if (this.#state === DEAD || chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
  }

  next(): DataFrame | null {
    for (;;) {
      switch (this.#state) {
        case GET_SIZE: {
          const f = this.#getSize();
          if (f !== undefined) return f;
          if (this.#state === GET_SIZE) return null;
          break;
        }
        case GET_COMMAND:
          return this.#getCommand();
        case DISCARD:
          if (!this.#discard()) return null;
          break;
        default:
          return null;
      }
    }
  }

  /** Returns a rejection frame, or undefined when it only advanced (or ran out of bytes). */
  #getSize(): DataFrame | undefined {
    if (this.#buffered < SIZE_PREFIX) return undefined;
    const head = this.#peek(SIZE_PREFIX);
    const size = ((head[2]! << 24) | (head[3]! << 16) | (head[4]! << 8) | head[5]!) >>> 0;
    if (size < TPM_HEADER_SIZE) {
      this.#state = DEAD;
      this.#chunks = [];
      this.#buffered = 0;
      return { kind: 'too-small', size };
    }
    if (size > this.maxCommandSize) {
      this.#take(SIZE_PREFIX);
      this.#skip = size - SIZE_PREFIX;
      this.#state = DISCARD;
      return { kind: 'too-large', size };
    }
    this.#size = size;
    this.#state = GET_COMMAND;
    return undefined;
  }

  #getCommand(): DataFrame | null {
    if (this.#buffered < this.#size) return null;
    const bytes = this.#take(this.#size);
    this.#state = GET_SIZE;
    return { kind: 'command', bytes };
  }

  #discard(): boolean {
    while (this.#skip > 0 && this.#chunks.length > 0) {
      const c = this.#chunks[0]!;
      const n = Math.min(c.length, this.#skip);
      this.#skip -= n;
      this.#buffered -= n;
      if (n === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(n);
    }
    if (this.#skip > 0) return false;
    this.#state = GET_SIZE;
    return true;
  }

  #peek(n: number): Uint8Array {
    const first = this.#chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    const out = new Uint8Array(n);
    let off = 0;
    for (const c of this.#chunks) {
      const k = Math.min(c.length, n - off);
      out.set(c.subarray(0, k), off);
      off += k;
      if (off === n) break;
    }
    return out;
  }

  /** Removes n buffered bytes (n <= buffered) into one fresh array the caller may keep. */
  #take(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let off = 0;
    while (off < n) {
      const c = this.#chunks[0]!;
      const k = Math.min(c.length, n - off);
      out.set(c.subarray(0, k), off);
      off += k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    this.#buffered -= n;
    return out;
  }
}
