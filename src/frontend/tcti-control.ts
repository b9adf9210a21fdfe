// The control port of the TCTI bridge: a thin server over the one control receiver (src/swtpm/) that
// answers the subset of swtpm's control channel the tpm2-tss `swtpm` TCTI uses (docs/protocols/swtpm-ctrl.md,
// "The tpm2-tss swtpm TCTI"). Framing, payload sizes and the 500 ms deadline are the receiver's; every
// command this port does not offer is answered TPM_BAD_ORDINAL, as swtpm answers one it cannot run.

import { Cap, Cmd, Res, resultOnly, u32s } from '../swtpm/codes.js';
import { CtrlReceiver, type CtrlRequest, type ReceiverEvent } from '../swtpm/ctrl-receiver.js';

export type ControlErrorCode = 'CTRL_TRUNCATED' | 'CTRL_TIMEOUT' | 'CTRL_BLOB_TOO_LARGE';

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
  let caps = Cap.SET_LOCALITY;
  if (t.init) caps |= Cap.INIT;
  if (t.cancel) caps |= Cap.CANCEL_TPM_CMD;
  return caps;
}

/**
 * One control connection: bytes in through push()/end(), replies out through the write callback.
 * Requests are answered one at a time and in order, as in swtpm's loop.
 */
export class ControlReceiver {
  readonly #rx: CtrlReceiver;
  #queue: ReceiverEvent[] = [];
  #busy = false;
  #ended = false;
  #closed = false;

  constructor(
    private readonly target: ControlTarget,
    private readonly peer: string,
    private readonly write: (bytes: Uint8Array) => void,
    private readonly close: () => void,
  ) {
    this.#rx = new CtrlReceiver((events) => this.#enqueue(events));
  }

  /** True while requests wait for an answer: the socket should stop reading. */
  get wantsPause(): boolean {
    return this.#busy || this.#queue.length > 0;
  }

  push(chunk: Uint8Array): void {
    if (this.#closed) return;
    this.#enqueue(this.#rx.push(chunk));
  }

  /** The peer finished sending: complete messages are still answered, a partial one is dropped. */
  end(): void {
    this.#ended = true;
    this.#run();
  }

  /** Drop everything (bridge stop or socket error). */
  destroy(): void {
    this.#closed = true;
    this.#queue = [];
    this.#rx.destroy();
  }

  #enqueue(events: ReceiverEvent[]): void {
    if (this.#closed) return;
    this.#queue.push(...events);
    this.#run();
  }

  #run(): void {
    while (!this.#busy && !this.#closed) {
      const ev = this.#queue.shift();
      if (!ev) break;
      if (ev.kind === 'error') {
        const { err } = ev;
        if (err.result !== null) this.write(resultOnly(err.result));
        if (!err.fatal) continue;
        // TRUNCATED comes only from the deadline here: end() reports a partial message itself.
        const code = err.code === 'BLOB_TOO_LARGE' ? 'CTRL_BLOB_TOO_LARGE' : 'CTRL_TIMEOUT';
        return this.#fail(code, err.message);
      }
      this.#busy = true;
      void this.#handle(ev.req).then(
        (reply) => this.#replied(reply),
        () => this.#replied(resultOnly(Res.FAIL)),
      );
    }
    if (this.#busy || this.#closed || !this.#ended) return;
    if (this.#rx.pending) this.#fail('CTRL_TRUNCATED', 'control message cut off by the end of the connection');
    else this.#finish();
  }

  #replied(reply: Uint8Array): void {
    this.#busy = false;
    if (this.#closed) return;
    this.write(reply);
    this.#run();
  }

  async #handle(req: CtrlRequest): Promise<Uint8Array> {
    const t = this.target;
    const p = req.payload;
    switch (req.cmd) {
      case Cmd.GET_CAPABILITY:
        // ptm_cap as swtpm 0.7 writes it: a big-endian u64, i.e. result 0 then the caps word.
        return u32s(Res.SUCCESS, controlCapabilities(t));
      case Cmd.INIT:
        if (!t.init) return resultOnly(Res.BAD_ORDINAL);
        await t.init(p.readUInt32BE(0));
        return resultOnly(Res.SUCCESS);
      case Cmd.SET_LOCALITY: {
        // swtpm reads only the first payload byte (QEMU sends the 4-byte union, the TCTI one byte).
        const loc = p[0]!;
        if (loc > 4 || (loc === 4 && t.rejectLocality4)) return resultOnly(Res.BAD_LOCALITY);
        t.setLocality(loc);
        return resultOnly(Res.SUCCESS);
      }
      case Cmd.CANCEL_TPM_CMD:
        if (!t.cancel) return resultOnly(Res.BAD_ORDINAL);
        await t.cancel();
        return resultOnly(Res.SUCCESS);
      default:
        // What swtpm answers a command its state does not allow: how a client learns it is not offered.
        return resultOnly(Res.BAD_ORDINAL);
    }
  }

  #finish(): void {
    this.destroy();
    this.close();
  }

  #fail(code: ControlErrorCode, message: string): void {
    this.destroy();
    this.target.onProtocolError(new ControlError(code, this.peer, message));
    this.close();
  }
}
