// The one TPM socket client of the tests: raw TPM commands to a data socket (a UNIX path, a TCP port or
// an fd such as QEMU's SET_DATAFD end), each response read whole by its header's size field.
import net from 'node:net';
import { readHeader, TPM_HEADER_SIZE } from '../../src/tpm/wire.js';

export type TpmTarget = { path: string } | { port: number; host?: string } | { fd: number };

export class TpmClient {
  #buf = Buffer.alloc(0);
  #wake: (() => void) | null = null;
  #closed = false;
  /** A TPM runs one command at a time: concurrent callers queue here. */
  #chain: Promise<unknown> = Promise.resolve();

  constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#wake?.();
    });
    sock.on('close', () => {
      this.#closed = true;
      this.#wake?.();
    });
    sock.on('error', () => {});
  }

  /** Connect; a socket file that exists but does not listen yet is retried for up to 5 s. */
  static async connect(t: TpmTarget): Promise<TpmClient> {
    if ('fd' in t) return new TpmClient(new net.Socket({ fd: t.fd, readable: true, writable: true }));
    for (let i = 0; ; i++) {
      try {
        return await new Promise<TpmClient>((resolve, reject) => {
          const s = 'path' in t ? net.connect(t.path) : net.connect({ host: t.host ?? '127.0.0.1', port: t.port });
          s.once('connect', () => {
            s.off('error', reject);
            if (!('path' in t)) s.setNoDelay(true);
            resolve(new TpmClient(s));
          });
          s.once('error', reject);
        });
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (i >= 250 || (code !== 'ECONNREFUSED' && code !== 'ENOENT')) throw err;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  /** The peer or we closed the connection: it carries nothing more. */
  get closed(): boolean {
    return this.#closed || this.sock.destroyed;
  }

  /** Send one command (after those already sent have been answered); resolve with its response. */
  transmit(command: Uint8Array, timeoutMs = 10_000): Promise<Uint8Array> {
    const run = this.#chain.then(() => this.#transmit(command, timeoutMs));
    this.#chain = run.catch(() => undefined);
    return run;
  }

  async #transmit(command: Uint8Array, timeoutMs: number): Promise<Uint8Array> {
    this.sock.write(command);
    const end = Date.now() + timeoutMs;
    for (;;) {
      const h = readHeader(this.#buf);
      if (h && h.size >= TPM_HEADER_SIZE && this.#buf.length >= h.size) {
        const r = new Uint8Array(this.#buf.subarray(0, h.size));
        this.#buf = this.#buf.subarray(h.size);
        return r;
      }
      if (this.#closed) throw new Error(`connection closed; have ${this.#buf.toString('hex')}`);
      if (Date.now() > end) throw new Error(`no response; have ${this.#buf.toString('hex')}`);
      await new Promise<void>((r) => {
        this.#wake = r;
        setTimeout(r, 50);
      });
    }
  }

  /** transmit() in hex, white space ignored. */
  async transmitHex(hex: string, timeoutMs?: number): Promise<string> {
    const r = await this.transmit(new Uint8Array(Buffer.from(hex.replace(/\s+/g, ''), 'hex')), timeoutMs);
    return Buffer.from(r).toString('hex');
  }

  close(): void {
    this.sock.destroy();
  }
}
