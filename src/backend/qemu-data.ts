// The TPM data channel of a QEMU endpoint (qemu-endpoint.ts): the socket QEMU passed with
// CMD_SET_DATAFD, carrying raw TPM commands in and raw responses out, one command at a time.
import net from 'node:net';
import { errorResponse, TPM_BAD_PARAM_SIZE, TPM_RC_COMMAND_SIZE } from '../tpm/error-response.js';

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
export class DataChannel {
  onClose: () => void = () => {};
  readonly #sock: net.Socket;
  readonly #ep: DataTarget;
  readonly #log: (l: string) => void;
  #buf: Buffer = Buffer.alloc(0);
  #discard = 0;
  /** Refused commands logged so far: three per channel, so a peer cannot flood the log. */
  #refusalsLogged = 0;
  #busy = false;
  #closed = false;

  constructor(fd: number, ep: DataTarget, log: (l: string) => void) {
    this.#sock = new net.Socket({ fd, readable: true, writable: true });
    this.#ep = ep;
    this.#log = log;
    this.#sock.on('data', (d: Buffer) => this.#onData(d));
    this.#sock.on('error', () => this.close());
    this.#sock.on('close', () => this.close());
  }

  #onData(d: Buffer): void {
    if (this.#discard > 0) {
      const n = Math.min(this.#discard, d.length);
      this.#discard -= n;
      d = d.subarray(n);
    }
    this.#buf = this.#buf.length ? Buffer.concat([this.#buf, d]) : d;
    if (this.#buf.length >= this.#ep.vtpm.bufferSize) this.#sock.pause();
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
    try {
      while (!this.#closed && this.#buf.length >= 10) {
        const size = this.#buf.readUInt32BE(2);
        const tag = this.#buf.readUInt16BE(0);
        const fam = tag === 0x8001 || tag === 0x8002 ? '2.0' : '1.2';
        const limit = this.#ep.vtpm.bufferSize;
        if (size < 10 || size > limit) {
          // Refused without buffering it: the TPM's own size error, then skip the declared body.
          if (this.#refusalsLogged < 3) {
            const more = ++this.#refusalsLogged === 3 ? ' (further refusals on this channel are not logged)' : '';
            this.#log(`data channel: command of ${size} bytes refused (buffer ${limit})${more}`);
          }
          const rc = fam === '2.0' ? TPM_RC_COMMAND_SIZE : TPM_BAD_PARAM_SIZE;
          const skip = size < 10 ? this.#buf.length : size;
          const n = Math.min(skip, this.#buf.length);
          this.#buf = this.#buf.subarray(n);
          this.#discard = skip - n;
          await this.#send(errorResponse(fam, rc, tag));
          continue;
        }
        if (this.#buf.length < size) break;
        const cmd = this.#buf.subarray(0, size);
        this.#buf = this.#buf.subarray(size);
        const rsp = await this.#ep.execute(cmd);
        await this.#send(rsp);
      }
      if (!this.#closed && this.#buf.length < this.#ep.vtpm.bufferSize) this.#sock.resume();
    } catch (err) {
      this.#log(`data channel: ${(err as Error).message}`);
      this.close();
    } finally {
      this.#busy = false;
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#sock.destroy();
    this.onClose();
  }
}
