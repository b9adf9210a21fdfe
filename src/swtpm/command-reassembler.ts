// The one TPM command reassembler of the swtpm data channel (docs/protocols/swtpm-ctrl.md, "Data
// channel"): raw TPM commands, no extra framing. Unlike swtpm, which takes one read() as one command,
// it reassembles each command from its header's size, so a command may arrive in pieces and several may
// share a read. Both servers of the data channel use it: the TCTI bridge's data port and the data
// channel QEMU passes to its endpoint.
import { TPM_HEADER_SIZE } from '../tpm/wire.js';

export { TPM_HEADER_SIZE };
/** Bytes needed to learn a command's size: tag + commandSize. */
const SIZE_PREFIX = 6;
/** The tpmif v2 shared page carries at most 4096 bytes (8 + 4088 with the header, docs/protocols/tpmif.md). */
export const DEFAULT_MAX_COMMAND_SIZE = 4096;

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
  /** commandSize above the limit: answer the size error of `tag`'s family; its bytes are skipped unread. */
  | { kind: 'too-large'; size: number; tag: number }
  /** commandSize below a header: answer the size error; the stream is lost until resync(). */
  | { kind: 'too-small'; size: number; tag: number };

const GET_SIZE = 0; // collecting tag + commandSize
const GET_COMMAND = 1; // collecting the rest of a command of known size
const DISCARD = 2; // skipping the body of a rejected oversize command
const DEAD = 3; // framing lost; nothing more is read until resync()

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

  readonly #max: () => number;

  /** `maxCommandSize`: a fixed limit, or a function read at each command (a buffer size that may change). */
  constructor(maxCommandSize: number | (() => number) = DEFAULT_MAX_COMMAND_SIZE) {
    if (typeof maxCommandSize === 'number') {
      checkMaxCommandSize(maxCommandSize);
      this.#max = () => maxCommandSize;
    } else this.#max = maxCommandSize;
  }

  get maxCommandSize(): number {
    return this.#max();
  }

  /** Bytes held and not yet returned (a pausing caller compares this with its buffer). */
  get buffered(): number {
    return this.#buffered;
  }

  /** After a too-small frame: drop what is held and read the next bytes as a new command. */
  resync(): void {
    this.#chunks = [];
    this.#buffered = 0;
    this.#skip = 0;
    this.#state = GET_SIZE;
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
    const tag = (head[0]! << 8) | head[1]!;
    const size = ((head[2]! << 24) | (head[3]! << 16) | (head[4]! << 8) | head[5]!) >>> 0;
    if (size < TPM_HEADER_SIZE) {
      this.#state = DEAD;
      this.#chunks = [];
      this.#buffered = 0;
      return { kind: 'too-small', size, tag };
    }
    if (size > this.#max()) {
      this.#take(SIZE_PREFIX);
      this.#skip = size - SIZE_PREFIX;
      this.#state = DISCARD;
      return { kind: 'too-large', size, tag };
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
