// Small TCP clients for a real swtpm (launched by test/helpers/swtpm.ts), used as the TPM behind the TCTI bridge and
// as the reference its control port is compared with.
import net from 'node:net';

import { freePortPair } from '../../src/cli/ports.js';
import { SwtpmProcess } from '../helpers/swtpm.js';

export { freePortPair, SwtpmProcess };

/**
 * Sends `req` on a new connection to a control port and collects what comes back until the server
 * closes, `want` bytes arrived, or `quietMs` passed without data.
 */
export async function ctrlExchange(
  port: number,
  req: Uint8Array,
  opts: { want?: number; quietMs?: number; end?: boolean } = {},
): Promise<{ reply: Buffer; closed: boolean }> {
  const s = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  return readReply(s, req, opts);
}

export function readReply(
  s: net.Socket,
  req: Uint8Array,
  opts: { want?: number; quietMs?: number; end?: boolean } = {},
  close = true,
): Promise<{ reply: Buffer; closed: boolean }> {
  const quietMs = opts.quietMs ?? 2000;
  return new Promise((resolve) => {
    let got = Buffer.alloc(0);
    let timer: NodeJS.Timeout;
    const finish = (closed: boolean): void => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('close', onClose);
      s.off('end', onClose);
      if (close) s.destroy();
      resolve({ reply: got, closed });
    };
    const arm = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => finish(false), quietMs);
    };
    const onData = (d: Buffer): void => {
      got = Buffer.concat([got, d]);
      if (opts.want !== undefined && got.length >= opts.want) finish(false);
      else arm();
    };
    // The server finishing its side (FIN) is what "closes the connection" means to a client.
    const onClose = (): void => finish(true);
    s.on('data', onData);
    s.on('close', onClose);
    s.once('end', onClose);
    s.on('error', () => undefined);
    arm();
    s.write(req);
    if (opts.end) s.end();
  });
}

/**
 * The transmit function behind the bridge in tests: each command goes to swtpm's data port over a
 * kept-open TCP connection, after SET_LOCALITY on swtpm's control port (a new connection each
 * time, as the swtpm TCTI does, so other control clients can get in between). Deliberately no
 * queue of its own: overlapping calls would interleave on the socket, so the bridge must serialise.
 */
export class SwtpmClient {
  #sock: net.Socket | undefined;
  #buf = Buffer.alloc(0);
  #busy = false;
  #waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;

  constructor(readonly swtpm: SwtpmProcess) {}

  async setLocality(loc: number): Promise<void> {
    const { reply } = await ctrlExchange(this.swtpm.ctrlPort, Uint8Array.of(0, 0, 0, 5, loc), { want: 4 });
    if (!reply.equals(Buffer.from([0, 0, 0, 0]))) throw new Error(`swtpm SET_LOCALITY(${loc}) -> ${reply.toString('hex')}`);
  }

  async init(flags: number): Promise<void> {
    const req = Buffer.alloc(8);
    req.writeUInt32BE(2, 0);
    req.writeUInt32BE(flags, 4);
    const { reply } = await ctrlExchange(this.swtpm.ctrlPort, req, { want: 4 });
    if (!reply.equals(Buffer.from([0, 0, 0, 0]))) throw new Error(`swtpm INIT -> ${reply.toString('hex')}`);
  }

  async transmit(cmd: Uint8Array, opts: { locality: number }): Promise<Uint8Array> {
    if (this.#busy) throw new Error('overlapping transmit: the caller did not serialise commands');
    this.#busy = true;
    try {
      return await this.#transmit(cmd, opts);
    } finally {
      this.#busy = false;
    }
  }

  async #transmit(cmd: Uint8Array, opts: { locality: number }): Promise<Uint8Array> {
    await this.setLocality(opts.locality);
    const s = await this.#socket();
    const rsp = new Promise<Buffer>((resolve, reject) => (this.#waiter = { resolve, reject }));
    s.write(cmd);
    this.#deliver();
    return new Uint8Array(await rsp);
  }

  close(): void {
    this.#sock?.destroy();
  }

  async #socket(): Promise<net.Socket> {
    if (this.#sock && !this.#sock.destroyed) return this.#sock;
    const s = net.connect({ host: '127.0.0.1', port: this.swtpm.port });
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    s.setNoDelay(true);
    s.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#deliver();
    });
    const fail = (): void => {
      const w = this.#waiter;
      this.#waiter = undefined;
      this.#sock = undefined;
      w?.reject(new Error('swtpm closed the data connection'));
    };
    s.on('close', fail);
    s.on('error', fail);
    this.#sock = s;
    return s;
  }

  #deliver(): void {
    if (!this.#waiter || this.#buf.length < 10) return;
    const size = this.#buf.readUInt32BE(2);
    if (this.#buf.length < size) return;
    const rsp = this.#buf.subarray(0, size);
    this.#buf = this.#buf.subarray(size);
    const w = this.#waiter;
    this.#waiter = undefined;
    w.resolve(Buffer.from(rsp));
  }
}
