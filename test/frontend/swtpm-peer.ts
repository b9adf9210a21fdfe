// Small TCP clients for a real swtpm (launched by test/helpers/swtpm.ts), used as the TPM behind the TCTI bridge and
// as the reference its control port is compared with.
import net from 'node:net';

import { freePortPair } from '../../src/cli/ports.js';
import { SwtpmProcess } from '../helpers/swtpm.js';
import { TpmClient } from '../helpers/tpm-client.js';

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
  #data: TpmClient | undefined;
  #busy = false;

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
      await this.setLocality(opts.locality);
      if (!this.#data || this.#data.closed) this.#data = await TpmClient.connect({ port: this.swtpm.port });
      return await this.#data.transmit(cmd);
    } finally {
      this.#busy = false;
    }
  }

  close(): void {
    this.#data?.close();
  }
}
