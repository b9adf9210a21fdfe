// The one launcher of a real swtpm process in tests: control and data on a TCP port pair (data P,
// control P+1, as the tpm2-tss swtpm TCTI wants), or on UNIX sockets (data optional: QEMU passes its
// own with SET_DATAFD). start() resolves once swtpm accepts connections; stop() waits for its exit.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { freePortPair } from '../../src/cli/ports.js';
import { tempDir, removeDir } from './temp.js';

export interface SwtpmStart {
  /** --tpmstate dir (created if missing). */
  stateDir: string;
  version?: '2.0' | '1.2';
  /** tcp: a free port pair on 127.0.0.1; unix: `ctrlPath` (and `dataPath` when given). */
  transport: 'tcp' | 'unix';
  ctrlPath?: string;
  dataPath?: string;
  /** --flags, e.g. 'not-need-init' or 'not-need-init,startup-clear'. */
  flags?: string;
  /** --log file (level 2: control commands with their bytes). */
  logFile?: string;
}

const READY_MS = 10_000;

export class SwtpmProcess {
  readonly stderr = { text: '' };
  #exited = false;
  /** A state directory this launcher made, removed by stop(). */
  #ownDir: string | undefined;

  private constructor(
    readonly proc: ChildProcess,
    /** TCP data port (0 with UNIX sockets); control is port + 1. */
    readonly port: number,
    readonly ctrlPath: string | undefined,
    readonly dataPath: string | undefined,
  ) {
    proc.stderr?.on('data', (d: Buffer) => (this.stderr.text += d.toString()));
    proc.on('exit', () => (this.#exited = true));
  }

  get ctrlPort(): number {
    return this.port + 1;
  }

  get exited(): boolean {
    return this.#exited;
  }

  /** `-T swtpm:...` for tpm2-tools (tpm2-tss 3.2 takes host/port only). */
  get tcti(): string {
    return `swtpm:host=127.0.0.1,port=${this.port}`;
  }

  static async start(o: SwtpmStart): Promise<SwtpmProcess> {
    fs.mkdirSync(o.stateDir, { recursive: true });
    const base = ['socket', ...(o.version === '1.2' ? [] : ['--tpm2']), '--tpmstate', `dir=${o.stateDir}`];
    if (o.flags) base.push('--flags', o.flags);
    if (o.logFile) base.push('--log', `level=2,file=${o.logFile}`);
    if (o.transport === 'unix') {
      if (!o.ctrlPath) throw new Error('a UNIX swtpm needs ctrlPath');
      const args = [...base, '--ctrl', `type=unixio,path=${o.ctrlPath}`];
      if (o.dataPath) args.push('--server', `type=unixio,path=${o.dataPath}`);
      const sw = new SwtpmProcess(spawn('swtpm', args, { stdio: ['ignore', 'ignore', 'pipe'] }), 0, o.ctrlPath, o.dataPath);
      const paths = [o.ctrlPath, ...(o.dataPath ? [o.dataPath] : [])];
      const deadline = Date.now() + READY_MS;
      while (!sw.exited && Date.now() < deadline && !paths.every((p) => fs.existsSync(p))) await sleep(25);
      if (paths.every((p) => fs.existsSync(p))) return sw;
      await sw.stop();
      throw new Error(`swtpm did not create ${paths.join(' and ')}: ${sw.stderr.text}`);
    }
    // Another test may take the free pair before swtpm binds it: a swtpm that exits at once is retried.
    for (let attempt = 0; attempt < 5; attempt++) {
      const port = await freePortPair();
      const args = [...base, '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`, '--ctrl', `type=tcp,port=${port + 1},bindaddr=127.0.0.1`];
      const sw = new SwtpmProcess(spawn('swtpm', args, { stdio: ['ignore', 'ignore', 'pipe'] }), port, undefined, undefined);
      const deadline = Date.now() + READY_MS;
      while (!sw.exited && Date.now() < deadline) {
        // Probe only the data port: swtpm serves one control client at a time.
        if (await accepts(port)) return sw;
        await sleep(20);
      }
      const early = sw.exited;
      await sw.stop();
      if (!early) throw new Error(`swtpm did not listen on ${port}: ${sw.stderr.text}`);
    }
    throw new Error('swtpm would not start');
  }

  /** A TPM already started (Startup CLEAR done) on data and control sockets in a fresh temp dir. */
  static async onSockets(o: { version?: '2.0' | '1.2'; flags?: string } = {}): Promise<SwtpmProcess> {
    const dir = tempDir('swtpm');
    try {
      const sw = await SwtpmProcess.start({
        stateDir: dir,
        transport: 'unix',
        ctrlPath: join(dir, 'ctrl.sock'),
        dataPath: join(dir, 'data.sock'),
        flags: o.flags ?? 'not-need-init,startup-clear',
        ...(o.version ? { version: o.version } : {}),
      });
      sw.#ownDir = dir;
      return sw;
    } catch (err) {
      removeDir(dir);
      throw err;
    }
  }

  /** swtpm_ioctl against the UNIX control socket (e.g. '-i', '--save', 'permanent', file). */
  async ioctl(...args: string[]): Promise<string> {
    if (!this.ctrlPath) throw new Error('swtpm_ioctl needs a UNIX control socket');
    const { stdout } = await promisify(execFile)('swtpm_ioctl', ['--unix', this.ctrlPath, ...args]);
    return stdout;
  }

  /** SIGTERM, SIGKILL after 5 s; resolves once the process is gone. */
  async stop(): Promise<void> {
    if (!(this.#exited || this.proc.exitCode !== null || this.proc.signalCode !== null)) {
      const gone = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      const t = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(t);
    }
    if (this.#ownDir) removeDir(this.#ownDir);
  }
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}
