// The TPM data channel of a QEMU endpoint (qemu-endpoint.ts): the socket QEMU passed with
// CMD_SET_DATAFD, carrying raw TPM commands in and raw responses out, one command at a time
// (docs/protocols/swtpm-ctrl.md, "Data channel"); commands are cut out by the one reassembler.
import net from 'node:net';
import { spinReadable } from '../../native/busy-poll.js';
import { PollWindow } from '../xen/index.js';
import { CommandReceiver } from '../swtpm/command-reassembler.js';
import { errorResponse, familyOfTag, sizeErrorCode } from '../tpm/error-response.js';

/** What the channel runs commands on: the endpoint (its vTPM, at the locality the control channel set). */
export interface DataTarget {
  readonly vtpm: { readonly bufferSize: number };
  execute(command: Uint8Array): Promise<Uint8Array>;
}

/**
 * The TPM data channel over the fd QEMU passed: raw commands in, raw responses out, one at a time.
 * It holds at most one command's worth of input (reading pauses beyond that, so a peer pipelining
 * commands keeps them in its own socket buffer, as with swtpm's blocking read) and waits for a
 * response to be taken before it reads on, so a peer that stops reading stalls only itself.
 */
/**
 * A QEMU socket's last answer is out: after this turn's other callbacks (once Node has taken the answer
 * off its queue), spin a window for the peer's next message if the window says it pays and `idle()`
 * (nothing queued, nothing unwritten) still holds (docs/qemu.md, "Where the time goes").
 */
export function awaitNextOnSocket(poll: PollWindow, fd: number, idle: () => boolean): void {
  poll.answered();
  const budget = poll.budgetUs;
  if (budget <= 0) return;
  setImmediate(() => {
    if (!idle() || !poll.awaiting) return;
    const t0 = performance.now();
    const end = spinReadable(fd, budget);
    poll.lastSpin = { end, us: (performance.now() - t0) * 1000 };
  });
}

export class DataChannel {
  onClose: () => void = () => {};
  readonly #sock: net.Socket;
  readonly #ep: DataTarget;
  readonly #log: (l: string) => void;
  readonly #rx: CommandReceiver;
  readonly #fd: number;
  /** Whether spinning for the peer's next command after a response pays (src/xen/poll.ts). */
  readonly #poll: PollWindow;
  /** Refused commands logged so far: three per channel, so a peer cannot flood the log. */
  #refusalsLogged = 0;
  #busy = false;
  #closed = false;

  constructor(fd: number, ep: DataTarget, log: (l: string) => void, poll: PollWindow = new PollWindow()) {
    this.#sock = new net.Socket({ fd, readable: true, writable: true });
    this.#fd = fd;
    this.#poll = poll;
    this.#ep = ep;
    this.#log = log;
    // The limit is the vTPM's buffer, which SET_BUFFERSIZE may change between commands.
    this.#rx = new CommandReceiver(() => ep.vtpm.bufferSize);
    this.#sock.on('data', (d: Buffer) => this.#onData(d));
    this.#sock.on('error', () => this.close());
    this.#sock.on('close', () => this.close());
  }

  #onData(d: Buffer): void {
    this.#poll.arrived();
    this.#rx.push(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
    if (this.#rx.buffered >= this.#ep.vtpm.bufferSize) this.#sock.pause();
    void this.#pump();
  }

  /** Write a response; if the peer's socket is full, read nothing more until it has taken it. */
  async #send(rsp: Uint8Array): Promise<void> {
    if (this.#closed || this.#sock.write(rsp)) return;
    this.#sock.pause();
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.#sock.off('drain', done);
        this.#sock.off('close', done);
        resolve();
      };
      this.#sock.on('drain', done);
      this.#sock.on('close', done);
    });
  }

  async #pump(): Promise<void> {
    if (this.#busy) return;
    this.#busy = true;
    let answered = false;
    try {
      for (let f = this.#rx.next(); !this.#closed && f !== null; f = this.#rx.next()) {
        answered = true;
        if (f.kind === 'command') {
          await this.#send(await this.#ep.execute(f.bytes));
          continue;
        }
        // Refused without buffering it: the TPM's own size error. An oversize command's body is
        // skipped as it streams; after one below the header, what was read with it is dropped.
        if (this.#refusalsLogged < 3) {
          const more = ++this.#refusalsLogged === 3 ? ' (further refusals on this channel are not logged)' : '';
          this.#log(`data channel: command of ${f.size} bytes refused (buffer ${this.#ep.vtpm.bufferSize})${more}`);
        }
        if (f.kind === 'too-small') this.#rx.resync();
        const fam = familyOfTag(f.tag);
        await this.#send(errorResponse(fam, sizeErrorCode(fam)));
      }
      if (!this.#closed && this.#rx.buffered < this.#ep.vtpm.bufferSize) this.#sock.resume();
      if (answered) this.#awaitNext();
    } catch (err) {
      this.#log(`data channel: ${(err as Error).message}`);
      this.close();
    } finally {
      this.#busy = false;
    }
  }

  /** Every response is out: stay on the CPU for the peer's next command for a short window. */
  #awaitNext(): void {
    if (this.#closed) return;
    awaitNextOnSocket(this.#poll, this.#fd, () => !this.#closed && !this.#busy && this.#sock.writableLength === 0);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#sock.destroy();
    this.onClose();
  }
}
