// The control port of the TCTI bridge: the subset of swtpm's control channel (docs/protocols/swtpm-ctrl.md)
// that the tpm2-tss `swtpm` TCTI uses (§3.1), with swtpm's framing, result codes and quirks.
//
// Framing as swtpm's ctrlchannel_recv_cmd: a 4-byte big-endian command code, then the command's
// fixed payload; no length prefix. Like swtpm, a message is whatever one read delivered once the
// command's minimum is present (capped at swtpm's 4104-byte input buffer), so QEMU's 4-byte
// SET_LOCALITY union and the TCTI's 1-byte form both work. A command still incomplete 500 ms after
// its first byte, or cut off by EOF, closes the connection without a reply, as swtpm does.

import { CMD } from '../tpm/swtpm-ioctl.js';

export { CMD };

/** Capability bits answered to CMD_GET_CAPABILITY (PTM_CAP_*). */
export const PTM_CAP = {
  INIT: 0x0001,
  GET_TPMESTABLISHED: 0x0004,
  SET_LOCALITY: 0x0008,
  CANCEL_TPM_CMD: 0x0020,
} as const;

/** TPM 1.2-style results swtpm puts in ptm_res (libtpms tpm_error.h). */
export const PTM_RES = {
  SUCCESS: 0x00,
  BAD_PARAMETER: 0x03,
  FAIL: 0x09,
  BAD_ORDINAL: 0x0a,
  BAD_LOCALITY: 0x3d,
} as const;

/** INIT flag bit 0: delete the volatile state after reading it (Tss2_Tcti_Swtpm_Reset sets it). */
export const PTM_INIT_FLAG_DELETE_VOLATILE = 0x1;

/** swtpm reads at most 4 + sizeof(ptm_hdata) bytes as one control message. */
export const CTRL_MESSAGE_MAX = 4104;
/** swtpm gives a control message 500 ms from its first read to be complete. */
export const CTRL_DEADLINE_MS = 500;

export type ControlErrorCode = 'CTRL_TRUNCATED' | 'CTRL_TIMEOUT' | 'CTRL_STREAMED_UNSUPPORTED';

export class ControlError extends Error {
  constructor(
    readonly code: ControlErrorCode,
    readonly peer: string,
    message: string,
  ) {
    super(`${peer}: ${message}`);
    this.name = 'ControlError';
  }
}

/** What the control port can do to the TPM behind the bridge; supplied by the bridge. */
export interface ControlTarget {
  setLocality(loc: number): void;
  readonly rejectLocality4: boolean;
  /** CMD_INIT, run in the TPM's command order; absent = not offered (BAD_ORDINAL, like unknown). */
  init?: (flags: number) => Promise<void>;
  /** CMD_CANCEL_TPM_CMD, run at once (it must overtake the running command). */
  cancel?: () => Promise<void>;
  /** Offender reports; the connection is already being closed. */
  onProtocolError(err: ControlError): void;
}

export function controlCapabilities(t: Pick<ControlTarget, 'init' | 'cancel'>): number {
  let caps = PTM_CAP.SET_LOCALITY;
  if (t.init) caps |= PTM_CAP.INIT;
  if (t.cancel) caps |= PTM_CAP.CANCEL_TPM_CMD;
  return caps;
}

/**
 * Bytes swtpm waits for before it processes a command (ctrlchannel_recv_cmd). Only commands this
 * bridge implements get their own size; every other code is answered after its 4 bytes.
 */
function neededBytes(code: number): number {
  switch (code) {
    case CMD.INIT:
      return 8; // init_flags u32
    case CMD.SET_LOCALITY:
      return 5; // loc u8
    default:
      return 4;
  }
}

const result = (res: number): Uint8Array => u32be(res);

function u32be(v: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v >>> 0);
  return b;
}

const GET_CODE = 0; // waiting for the 4-byte command code
const GET_PAYLOAD = 1; // code known, waiting for the command's fixed payload
const BUSY = 2; // a handler is running; further input is held
const CLOSED = 3;

/**
 * One control connection: bytes in through push()/end(), replies out through the write callback.
 * Handlers run one at a time per connection, as in swtpm's loop.
 */
export class ControlReceiver {
  #state = GET_CODE;
  #buf: Uint8Array = new Uint8Array(0);
  #code = 0;
  #needed = 4;
  #deadline: NodeJS.Timeout | undefined;
  #ended = false;

  constructor(
    private readonly target: ControlTarget,
    private readonly peer: string,
    private readonly write: (bytes: Uint8Array) => void,
    private readonly close: () => void,
  ) {}

  /** True while the receiver holds enough input that the socket should stop reading. */
  get wantsPause(): boolean {
    return this.#state === BUSY || this.#buf.length >= CTRL_MESSAGE_MAX;
  }

  push(chunk: Uint8Array): void {
    if (this.#state === CLOSED) return;
    this.#buf = this.#buf.length === 0 ? chunk : concat(this.#buf, chunk);
    this.#run();
  }

  /** The peer finished sending: complete messages are still answered, a partial one is dropped. */
  end(): void {
    this.#ended = true;
    this.#run();
  }

  /** Drop everything (bridge stop or socket error). */
  destroy(): void {
    this.#state = CLOSED;
    clearTimeout(this.#deadline);
    this.#deadline = undefined;
    this.#buf = new Uint8Array(0);
  }

  #run(): void {
    for (;;) {
      let progressed: boolean;
      if (this.#state === GET_CODE) progressed = this.#getCode();
      else if (this.#state === GET_PAYLOAD) progressed = this.#getPayload();
      else return;
      if (!progressed) return this.#outOfBytes();
    }
  }

  #getCode(): boolean {
    if (this.#buf.length === 0) return false;
    this.#armDeadline(); // the clock starts at a message's first byte
    if (this.#buf.length < 4) return false;
    this.#code = readU32(this.#buf, 0);
    this.#needed = neededBytes(this.#code);
    this.#state = GET_PAYLOAD;
    return true;
  }

  #getPayload(): boolean {
    if (this.#buf.length < this.#needed) return false;
    clearTimeout(this.#deadline);
    this.#deadline = undefined;
    // One read's worth: everything present, up to swtpm's buffer size.
    const take = Math.min(this.#buf.length, CTRL_MESSAGE_MAX);
    const payload = this.#buf.subarray(4, take);
    this.#buf = this.#buf.subarray(take);
    this.#state = BUSY;
    const code = this.#code;
    void this.#handle(code, payload).then(
      (reply) => this.#replied(code, reply),
      () => this.#replied(code, result(PTM_RES.FAIL)),
    );
    return true;
  }

  #outOfBytes(): void {
    if (!this.#ended) return;
    if (this.#state === GET_CODE && this.#buf.length === 0) this.#finish();
    else this.#fail('CTRL_TRUNCATED', `control message cut off after ${this.#buf.length} bytes`);
  }

  #replied(code: number, reply: Uint8Array): void {
    if (this.#state === CLOSED) return;
    this.write(reply);
    if (code === CMD.HASH_DATA || code === CMD.SET_STATEBLOB) {
      // Their payload streams after the header; not implementing them, we cannot find the next
      // command in what follows, so the connection ends here.
      this.#fail('CTRL_STREAMED_UNSUPPORTED', `streamed control command 0x${hex(code)} is not offered`);
      return;
    }
    this.#state = GET_CODE;
    this.#run();
  }

  async #handle(code: number, payload: Uint8Array): Promise<Uint8Array> {
    const t = this.target;
    switch (code) {
      case CMD.GET_CAPABILITY: {
        // ptm_cap as swtpm 0.7 writes it: a big-endian u64, i.e. result 0 then the caps word.
        const out = new Uint8Array(8);
        new DataView(out.buffer).setUint32(4, controlCapabilities(t));
        return out;
      }
      case CMD.INIT: {
        if (!t.init) return result(PTM_RES.BAD_ORDINAL);
        if (payload.length !== 4) return result(PTM_RES.BAD_PARAMETER);
        await t.init(readU32(payload, 0));
        return result(PTM_RES.SUCCESS);
      }
      case CMD.SET_LOCALITY: {
        // swtpm accepts >= 1 payload byte and reads only the first (QEMU sends the 4-byte union).
        const loc = payload[0]!;
        if (loc > 4 || (loc === 4 && t.rejectLocality4)) return result(PTM_RES.BAD_LOCALITY);
        t.setLocality(loc);
        return result(PTM_RES.SUCCESS);
      }
      case CMD.CANCEL_TPM_CMD: {
        if (!t.cancel) return result(PTM_RES.BAD_ORDINAL);
        if (payload.length !== 0) return result(PTM_RES.BAD_PARAMETER);
        await t.cancel();
        return result(PTM_RES.SUCCESS);
      }
      default:
        // swtpm: "Unknown command" -> TPM_BAD_ORDINAL; also what it answers for commands its
        // current state does not allow, which is how a client learns a command is not offered.
        return result(PTM_RES.BAD_ORDINAL);
    }
  }

  #armDeadline(): void {
    if (this.#deadline !== undefined) return;
    this.#deadline = setTimeout(() => {
      this.#deadline = undefined;
      if (this.#state === GET_CODE || this.#state === GET_PAYLOAD) {
        this.#fail('CTRL_TIMEOUT', `control message incomplete after ${CTRL_DEADLINE_MS} ms (${this.#buf.length} bytes)`);
      }
    }, CTRL_DEADLINE_MS);
    this.#deadline.unref();
  }

  #finish(): void {
    clearTimeout(this.#deadline);
    this.#state = CLOSED;
    this.close();
  }

  #fail(code: ControlErrorCode, message: string): void {
    this.destroy();
    this.target.onProtocolError(new ControlError(code, this.peer, message));
    this.close();
  }
}

function readU32(b: Uint8Array, off: number): number {
  return ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

const hex = (v: number): string => v.toString(16).padStart(8, '0');
