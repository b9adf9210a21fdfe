// The peer: a real `swtpm socket` process (Debian swtpm) with UnixIO data and control sockets, and a
// client for its data socket: the peer every benchmark compares with (tests use test/helpers/swtpm.ts).
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface SwtpmOptions {
  /** State directory; the sockets are created in it too. */
  dir: string;
  version?: '2.0' | '1.2';
  /** --flags value; null starts swtpm waiting for CMD_INIT (as QEMU does). */
  flags?: string | null;
}

export class SwtpmProcess {
  readonly dataPath: string;
  readonly ctrlPath: string;
  readonly #child: ChildProcess;
  readonly #exit: Promise<void>;

  private constructor(dir: string, child: ChildProcess) {
    this.dataPath = join(dir, 'data.sock');
    this.ctrlPath = join(dir, 'ctrl.sock');
    this.#child = child;
    this.#exit = new Promise((r) => child.once('exit', () => r()));
  }

  get pid(): number {
    return this.#child.pid ?? -1;
  }

  /** Spawn swtpm and resolve once both sockets exist. */
  static async start(opts: SwtpmOptions): Promise<SwtpmProcess> {
    const args = ['socket', '--tpmstate', `dir=${opts.dir}`];
    if ((opts.version ?? '2.0') === '2.0') args.push('--tpm2');
    args.push('--server', `type=unixio,path=${join(opts.dir, 'data.sock')}`);
    args.push('--ctrl', `type=unixio,path=${join(opts.dir, 'ctrl.sock')}`);
    const flags = opts.flags === undefined ? 'not-need-init,startup-clear' : opts.flags;
    if (flags) args.push('--flags', flags);
    // swtpm logs every data-client disconnect on stderr; keep the last bytes for a failed start only.
    const child = spawn('swtpm', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let errTail = '';
    child.stderr!.on('data', (c: Buffer) => (errTail = (errTail + c.toString()).slice(-2000)));
    const sw = new SwtpmProcess(opts.dir, child);
    let exited = false;
    void sw.#exit.then(() => (exited = true));
    while (!existsSync(sw.dataPath) || !existsSync(sw.ctrlPath)) {
      if (exited) throw new Error(`swtpm exited during start (${args.join(' ')}): ${errTail}`);
      await new Promise((r) => setTimeout(r, 1));
    }
    return sw;
  }

  /** Run swtpm_ioctl against the control socket. */
  async ioctl(...args: string[]): Promise<string> {
    const { stdout } = await execFileP('swtpm_ioctl', ['--unix', this.ctrlPath, ...args]);
    return stdout;
  }

  /** Connect to the data socket; the file appears just before swtpm listens, so retry briefly. */
  async connect(): Promise<SwtpmConnection> {
    for (let i = 0; ; i++) {
      try {
        return await SwtpmConnection.open(this.dataPath);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (i >= 2000 || (code !== 'ECONNREFUSED' && code !== 'ENOENT')) throw err;
        await new Promise((r) => setTimeout(r, 1));
      }
    }
  }

  async stop(): Promise<void> {
    if (this.#child.exitCode === null && this.#child.signalCode === null) this.#child.kill('SIGTERM');
    await this.#exit;
  }
}

/** One persistent data connection: write a command, read exactly one response (by its size field). */
export class SwtpmConnection {
  readonly #sock: Socket;
  #buf = Buffer.alloc(0);
  #waiter: ((r: Uint8Array) => void) | null = null;

  private constructor(sock: Socket) {
    this.#sock = sock;
    sock.on('data', (c: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, c]);
      this.#check();
    });
  }

  static open(path: string): Promise<SwtpmConnection> {
    return new Promise((resolve, reject) => {
      const s = connect(path, () => resolve(new SwtpmConnection(s)));
      s.once('error', reject);
    });
  }

  #check(): void {
    if (!this.#waiter || this.#buf.length < 10) return;
    const size = this.#buf.readUInt32BE(2);
    if (this.#buf.length < size) return;
    const resp = new Uint8Array(this.#buf.subarray(0, size));
    this.#buf = this.#buf.subarray(size);
    const w = this.#waiter;
    this.#waiter = null;
    w(resp);
  }

  transact(command: Uint8Array): Promise<Uint8Array> {
    return new Promise((resolve) => {
      this.#waiter = resolve;
      this.#sock.write(command);
    });
  }

  close(): void {
    this.#sock.destroy();
  }
}
