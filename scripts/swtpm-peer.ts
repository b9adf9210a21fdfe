// A real swtpm process and a client for its data channel: the peer every benchmark compares with,
// and a real TPM for tests of layers that only need "something that answers TPM commands".
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface SwtpmOptions {
  version?: '2.0' | '1.2';
  /** State directory; a fresh temp dir (removed on stop) when omitted. */
  stateDir?: string;
  /** Start with TPM2_Startup(CLEAR) done (`--flags not-need-init,startup-clear`). */
  startup?: boolean;
}

/** One TPM command at a time over one connection to swtpm's data socket. */
export class SwtpmClient {
  readonly #sock: net.Socket;
  #buf: Buffer = Buffer.alloc(0);
  #want: ((r: Uint8Array) => void) | null = null;
  #chain: Promise<unknown> = Promise.resolve();

  constructor(sock: net.Socket) {
    this.#sock = sock;
    sock.on('data', (d: Buffer) => {
      this.#buf = this.#buf.length ? Buffer.concat([this.#buf, d]) : d;
      if (this.#buf.length >= 6) {
        const size = this.#buf.readUInt32BE(2);
        if (this.#buf.length >= size && this.#want) {
          const r = new Uint8Array(this.#buf.subarray(0, size));
          this.#buf = this.#buf.subarray(size);
          const w = this.#want;
          this.#want = null;
          w(r);
        }
      }
    });
  }

  static async connect(path: string): Promise<SwtpmClient> {
    const sock = net.createConnection(path);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    return new SwtpmClient(sock);
  }

  transmit(command: Uint8Array): Promise<Uint8Array> {
    const run = this.#chain.then(
      () =>
        new Promise<Uint8Array>((resolve) => {
          this.#want = resolve;
          this.#sock.write(command);
        }),
    );
    this.#chain = run.catch(() => undefined);
    return run;
  }

  close(): void {
    this.#sock.destroy();
  }
}

export class Swtpm {
  readonly proc: ChildProcess;
  readonly dataPath: string;
  readonly ctrlPath: string;
  readonly stateDir: string;
  readonly #ownDir: string | null;

  private constructor(proc: ChildProcess, dataPath: string, ctrlPath: string, stateDir: string, ownDir: string | null) {
    this.proc = proc;
    this.dataPath = dataPath;
    this.ctrlPath = ctrlPath;
    this.stateDir = stateDir;
    this.#ownDir = ownDir;
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** Start `swtpm socket` on UNIX sockets and wait until its data socket exists. */
  static async start(opts: SwtpmOptions = {}): Promise<Swtpm> {
    const own = opts.stateDir ? null : mkdtempSync(join(os.tmpdir(), 'swtpm-peer-'));
    const stateDir = opts.stateDir ?? own!;
    const dataPath = join(stateDir, 'data.sock');
    const ctrlPath = join(stateDir, 'ctrl.sock');
    const args = [
      'socket',
      ...(opts.version === '1.2' ? [] : ['--tpm2']),
      '--tpmstate', `dir=${stateDir}`,
      '--server', `type=unixio,path=${dataPath}`,
      '--ctrl', `type=unixio,path=${ctrlPath}`,
      '--flags', opts.startup === false ? 'not-need-init' : 'not-need-init,startup-clear',
    ];
    const proc = spawn('swtpm', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    for (let i = 0; i < 500; i++) {
      if (existsSync(dataPath)) return new Swtpm(proc, dataPath, ctrlPath, stateDir, own);
      if (proc.exitCode !== null) break;
      await sleep(10);
    }
    proc.kill('SIGKILL');
    throw new Error(`swtpm did not start: ${stderr}`);
  }

  /** Connect to the data socket; swtpm binds it a moment before it listens, so retry briefly. */
  async connect(): Promise<SwtpmClient> {
    for (let i = 0; ; i++) {
      try {
        return await SwtpmClient.connect(this.dataPath);
      } catch (err) {
        if (i >= 200 || (err as NodeJS.ErrnoException).code !== 'ECONNREFUSED') throw err;
        await sleep(10);
      }
    }
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      await exited;
    }
    if (this.#ownDir) rmSync(this.#ownDir, { recursive: true, force: true });
  }
}
