// Shared bits of the multi-VM tests: the CLI, host status, and a persistent client of a guest's TCTI
// data port (raw TPM commands, responses framed by their own header size) that times every command.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../helpers/child.js';

export const run = promisify(execFile);
const cli = join(ROOT, 'dist/src/cli/main.js');
export const vtpm = (...args: string[]) => run(process.execPath, [cli, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1' } });

export interface Proc {
  role: string;
  domid: number;
  pid: number;
  alive: boolean;
  vm?: string;
  instance?: number;
}

export async function status(runDir: string): Promise<{ mode: string; processes: Proc[] }> {
  return JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { mode: string; processes: Proc[] };
}

export const tcti = (port: number) => ({ ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` });

/** One TCP connection to a TCTI bridge's data port; one command at a time. */
export class DataClient {
  readonly #sock: net.Socket;
  #buf = Buffer.alloc(0);
  #waiting: ((b: Buffer) => void) | null = null;
  #failed: Error | null = null;

  private constructor(sock: net.Socket) {
    this.#sock = sock;
    sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#check();
    });
    sock.on('error', (e) => (this.#failed = e));
  }

  static connect(port: number): Promise<DataClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ host: '127.0.0.1', port }, () => resolve(new DataClient(s)));
      s.once('error', reject);
    });
  }

  #check(): void {
    if (!this.#waiting || this.#buf.length < 10) return;
    const size = this.#buf.readUInt32BE(2);
    if (this.#buf.length < size) return;
    const rsp = this.#buf.subarray(0, size);
    this.#buf = this.#buf.subarray(size);
    const w = this.#waiting;
    this.#waiting = null;
    w(Buffer.from(rsp));
  }

  /** Send one command; resolves with the response (or rejects after timeoutMs: a hang). */
  transmit(cmd: Uint8Array, timeoutMs = 10_000): Promise<Buffer> {
    if (this.#failed) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no response in ${timeoutMs} ms`)), timeoutMs);
      this.#waiting = (b) => {
        clearTimeout(t);
        resolve(b);
      };
      this.#sock.write(cmd);
      this.#check();
    });
  }

  close(): void {
    this.#sock.destroy();
  }
}

export const rc = (rsp: Buffer): number => rsp.readUInt32BE(6);

/** Print the tail of every log of the host in runDir (backend, manager, guests) to stderr. */
export function dumpLogs(runDir: string, lines = 40): void {
  const dir = join(runDir, 'logs');
  let names: string[] = [];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const text = fs.readFileSync(join(dir, n), 'utf8').split('\n').slice(-lines).join('\n');
    process.stderr.write(`----- ${n} -----\n${text}\n`);
  }
}
