// Shared by the xenstore tests: a real `vtpm xenstored` process in a temp dir, and a raw socket that
// sends exact frames and collects exact reply bytes.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { HEADER_SIZE, XsReceiver, type XsMessage } from '../../src/xenstore/wire.js';
import { afterAll, beforeAll } from 'vitest';
import { XsClient } from '../../src/xenstore/client.js';
import { tempDir, removeDir } from '../helpers/temp.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const MAIN = path.join(ROOT, 'dist/src/cli/main.js');

export interface Daemon {
  dir: string;
  socket: string;
  domDir: string;
  proc: ChildProcess;
  stderr: () => string;
  /** Path of an introduced domain's socket. */
  domSocket(domid: number): string;
  stop(): Promise<void>;
}

/** Start `node dist/src/cli/main.js xenstored` and wait for its "listening" line. */
export async function startDaemon(): Promise<Daemon> {
  const dir = tempDir('xs');
  const socket = path.join(dir, 'socket');
  const domDir = path.join(dir, 'domains');
  const proc = spawn(process.execPath, [MAIN, 'xenstored', '--socket', socket, '--domain-socket-dir', domDir, '--verbose'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('listening')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`xenstored exited ${code}: ${err}`)));
  });
  return {
    dir,
    socket,
    domDir,
    proc,
    stderr: () => err,
    domSocket: (domid) => path.join(domDir, `dom${domid}.sock`),
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await exited;
      }
      removeDir(dir);
    },
  };
}

/** A connection that speaks bytes: write frames, await decoded replies in arrival order. */
export class RawConn {
  readonly messages: XsMessage[] = [];
  readonly bytes: Buffer[] = [];
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(readonly socket: net.Socket) {
    const rx = new XsReceiver((m) => {
      this.messages.push(m);
      this.wake();
    });
    socket.on('data', (d: Buffer) => {
      this.bytes.push(d);
      rx.push(d);
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  static connect(p: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(p);
      s.once('error', reject);
      s.once('connect', () => resolve(new RawConn(s)));
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(b: Buffer): void {
    this.socket.write(b);
  }

  /** Wait until n messages have arrived (or the connection closed). */
  async waitMessages(n: number, timeoutMs = 5000): Promise<XsMessage[]> {
    const t0 = Date.now();
    while (this.messages.length < n && !this.closed) {
      if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${n} messages, have ${this.messages.length}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
    return this.messages.slice(0, n);
  }

  /** Wait for the daemon to close this connection. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    const t0 = Date.now();
    while (!this.closed) {
      if (Date.now() - t0 > timeoutMs) throw new Error('connection not closed');
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  allBytes(): Buffer {
    return Buffer.concat(this.bytes);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Hex of a buffer, for readable byte assertions. */
export function hex(b: Buffer): string {
  return b.toString('hex');
}

export function header(type: number, reqId: number, txId: number, len: number): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  h.writeUInt32LE(type, 0);
  h.writeUInt32LE(reqId, 4);
  h.writeUInt32LE(txId, 8);
  h.writeUInt32LE(len, 12);
  return h;
}

/** Connect a client, retrying briefly while a just-created socket file appears. */
export async function connectClient(p: string): Promise<XsClient> {
  for (let i = 0; ; i++) {
    try {
      return await XsClient.connect(p);
    } catch (err) {
      if (i > 50) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Expect a promise to reject with an XsError of the given code. */
export async function errnoOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
  return 'no error';
}

/**
 * One daemon and one dom0 client for a whole test file: started before its tests, stopped after.
 * `use` hands both to the file once they are up.
 */
export function daemonPerFile(use: (d: Daemon, c: XsClient) => void): void {
  let d: Daemon | undefined;
  let c: XsClient | undefined;
  beforeAll(async () => {
    d = await startDaemon();
    c = await connectClient(d.socket);
    use(d, c);
  });
  afterAll(async () => {
    await c?.close();
    await d?.stop();
  });
}
