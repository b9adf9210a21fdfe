// The one receiver of swtpm's control channel (docs/protocols/swtpm-ctrl.md, "Control framing"): it
// turns the bytes (and passed fds) of a control connection into requests, with swtpm's payload sizes
// and its 500 ms deadline. The QEMU endpoint and the TCTI bridge serve what it yields.
//
// Framing (swtpm ctrlchannel.c): a request is a 4-byte big-endian code followed by that command's
// payload, with no length prefix; the server knows each size. swtpm is message based: one recvmsg()
// starts a command and it reads on until the command's minimum size is there, for at most 500 ms; a
// message still short then makes swtpm 0.7.1 hang up without a reply (measured). Bytes that came along
// with a command beyond what it uses belong to it (swtpm answers TPM_BAD_PARAMETER to extra bytes after
// payload-less commands and INIT). SET_STATEBLOB carries its blob length in its header and is read to
// the end. The receiver mirrors that, as a state machine.

import { CTRL_DEADLINE_MS, Cmd, MAX_STATE_BLOB, Res } from './codes.js';

/** Payload bytes each command needs after its code; `exact` ones refuse extra bytes (swtpm does). */
const PAYLOAD: Record<number, { min: number; exact: boolean }> = {
  [Cmd.GET_CAPABILITY]: { min: 0, exact: true },
  [Cmd.INIT]: { min: 4, exact: true },
  [Cmd.SHUTDOWN]: { min: 0, exact: true },
  [Cmd.GET_TPMESTABLISHED]: { min: 0, exact: true },
  [Cmd.SET_LOCALITY]: { min: 1, exact: false },
  [Cmd.CANCEL_TPM_CMD]: { min: 0, exact: true },
  [Cmd.STORE_VOLATILE]: { min: 0, exact: true },
  [Cmd.RESET_TPMESTABLISHED]: { min: 1, exact: false },
  [Cmd.GET_STATEBLOB]: { min: 12, exact: false },
  [Cmd.SET_STATEBLOB]: { min: 12, exact: false },
  [Cmd.STOP]: { min: 0, exact: true },
  [Cmd.GET_CONFIG]: { min: 0, exact: true },
  [Cmd.SET_DATAFD]: { min: 0, exact: true },
  [Cmd.SET_BUFFERSIZE]: { min: 4, exact: false },
  [Cmd.GET_INFO]: { min: 16, exact: false },
};

export type CtrlErrorCode = 'TRUNCATED' | 'EXTRA_BYTES' | 'BLOB_TOO_LARGE' | 'UNKNOWN_COMMAND';

/**
 * A control request the receiver refused: `result` is what swtpm answers (null: it answers nothing),
 * `fatal` closes the connection afterwards.
 */
export class CtrlProtocolError extends Error {
  constructor(
    readonly code: CtrlErrorCode,
    readonly result: number | null,
    readonly command: number,
    message: string,
    readonly fatal = false,
  ) {
    super(`control command 0x${command.toString(16)}: ${message}`);
    this.name = 'CtrlProtocolError';
  }
}

export interface CtrlRequest {
  cmd: number;
  /** The payload after the code (for SET_STATEBLOB: the 12-byte header; the blob is in `blob`). */
  payload: Buffer;
  blob?: Buffer;
  /** Descriptors that arrived with this request (SCM_RIGHTS); the handler owns them. */
  fds: number[];
}

export type ReceiverEvent = { kind: 'request'; req: CtrlRequest } | { kind: 'error'; err: CtrlProtocolError; fds: number[] };

const enum State {
  IDLE,
  CODE,
  PAYLOAD,
  BLOB,
}

/**
 * Turns received chunks (with their fds) into requests: call push() per read (recvmsg) result. A message
 * must be complete within `deadlineMs` of its first byte; with `onDeadline` the receiver runs that clock
 * itself and hands the expiry's events there (without it, the caller calls expire()).
 */
export class CtrlReceiver {
  readonly #onDeadline: ((events: ReceiverEvent[]) => void) | undefined;
  readonly #deadlineMs: number;
  #timer: NodeJS.Timeout | undefined;
  #state = State.IDLE;
  #buf: Buffer = Buffer.alloc(0);
  #cmd = 0;
  #fds: number[] = [];
  #blob: Buffer | null = null;
  #blobGot = 0;
  #header: Buffer | null = null;

  constructor(onDeadline?: (events: ReceiverEvent[]) => void, deadlineMs = CTRL_DEADLINE_MS) {
    this.#onDeadline = onDeadline;
    this.#deadlineMs = deadlineMs;
  }

  /** A command is started but not complete (its deadline is running). */
  get pending(): boolean {
    return this.#state !== State.IDLE;
  }

  /** Stop the clock and drop a partial message; returns the fds it held (the caller closes them). */
  destroy(): number[] {
    const fds = this.#fds;
    this.#reset();
    return fds;
  }

  push(chunk: Uint8Array, fds: number[] = []): ReceiverEvent[] {
    const out = this.#push(chunk, fds);
    // The clock starts at a message's first byte and stops when it completes (#reset).
    if (this.pending && this.#onDeadline && this.#timer === undefined) {
      const onDeadline = this.#onDeadline;
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        onDeadline(this.expire());
      }, this.#deadlineMs);
      this.#timer.unref();
    }
    return out;
  }

  #push(chunk: Uint8Array, fds: number[]): ReceiverEvent[] {
    const out: ReceiverEvent[] = [];
    let data = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.#fds.push(...fds);
    if (this.#state === State.BLOB) {
      data = this.#takeBlob(data, out);
      // Bytes after a complete blob start a new message.
      if (data.length === 0) return out;
    }
    if (this.#state === State.IDLE) {
      this.#state = State.CODE;
      this.#buf = data;
    } else {
      this.#buf = Buffer.concat([this.#buf, data]);
    }
    this.#advance(out);
    return out;
  }

  /** The deadline passed with a message still incomplete: swtpm 0.7.1 hangs up without a reply. */
  expire(): ReceiverEvent[] {
    if (this.#state === State.IDLE) return [];
    const cmd = this.#state === State.CODE ? 0 : this.#cmd;
    const what =
      this.#state === State.BLOB
        ? `state blob: ${this.#blobGot} of ${this.#blob?.length ?? 0} bytes arrived in time`
        : `only ${this.#buf.length} bytes arrived in time`;
    return [this.#fail(new CtrlProtocolError('TRUNCATED', null, cmd, what, true))];
  }

  #fail(err: CtrlProtocolError): ReceiverEvent {
    const fds = this.#fds;
    this.#reset();
    return { kind: 'error', err, fds };
  }

  #reset(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#state = State.IDLE;
    this.#buf = Buffer.alloc(0);
    this.#fds = [];
    this.#blob = null;
    this.#header = null;
    this.#blobGot = 0;
  }

  #advance(out: ReceiverEvent[]): void {
    if (this.#state === State.CODE) {
      if (this.#buf.length < 4) return;
      this.#cmd = this.#buf.readUInt32BE(0);
      this.#buf = this.#buf.subarray(4);
      this.#state = State.PAYLOAD;
    }
    if (this.#state !== State.PAYLOAD) return;
    const spec = PAYLOAD[this.#cmd];
    if (!spec) {
      // Unknown commands: swtpm answers TPM_BAD_ORDINAL and drops the rest of the message.
      out.push(this.#fail(new CtrlProtocolError('UNKNOWN_COMMAND', Res.BAD_ORDINAL, this.#cmd, 'unknown command')));
      return;
    }
    if (this.#buf.length < spec.min) return;
    if (this.#cmd === Cmd.SET_STATEBLOB) {
      const length = this.#buf.readUInt32BE(8);
      if (length > MAX_STATE_BLOB) {
        // The stream cannot be resynchronised past a blob we refuse to read: answer and hang up.
        out.push(this.#fail(new CtrlProtocolError('BLOB_TOO_LARGE', Res.FAIL, this.#cmd, `state blob of ${length} bytes exceeds ${MAX_STATE_BLOB}`, true)));
        return;
      }
      this.#header = Buffer.from(this.#buf.subarray(0, 12));
      const rest = this.#buf.subarray(12);
      this.#blob = Buffer.alloc(length);
      this.#blobGot = 0;
      this.#state = State.BLOB;
      this.#buf = Buffer.alloc(0);
      this.#takeBlob(rest, out); // bytes beyond the blob in the first message are dropped, as swtpm does
      return;
    }
    if (spec.exact && this.#buf.length > spec.min) {
      out.push(this.#fail(new CtrlProtocolError('EXTRA_BYTES', Res.BAD_PARAMETER, this.#cmd, `${this.#buf.length - spec.min} unexpected bytes after the command`)));
      return;
    }
    const req: CtrlRequest = { cmd: this.#cmd, payload: Buffer.from(this.#buf), fds: this.#fds };
    this.#fds = [];
    this.#reset();
    out.push({ kind: 'request', req });
  }

  /** Copy blob bytes; returns what is left of `data` after the blob completed. */
  #takeBlob(data: Buffer, out: ReceiverEvent[]): Buffer {
    const blob = this.#blob!;
    const n = Math.min(blob.length - this.#blobGot, data.length);
    data.copy(blob, this.#blobGot, 0, n);
    this.#blobGot += n;
    if (this.#blobGot < blob.length) return Buffer.alloc(0);
    const req: CtrlRequest = { cmd: Cmd.SET_STATEBLOB, payload: this.#header!, blob, fds: this.#fds };
    this.#fds = [];
    this.#reset();
    out.push({ kind: 'request', req });
    return data.subarray(n);
  }
}

