// Spawning compiled programs (dist/) with an IPC channel and waiting for their messages.
import { fork, type ChildProcess } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from './temp.js';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const dist = (p: string): string => join(ROOT, 'dist', p);

export interface Msg {
  kind: string;
  [k: string]: unknown;
}

export class Child {
  readonly proc: ChildProcess;
  readonly #inbox: Msg[] = [];
  readonly #waiting: Array<{ pred: (m: Msg) => boolean; resolve: (m: Msg) => void; reject: (e: Error) => void }> = [];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr = '';

  constructor(script: string, args: string[], env: NodeJS.ProcessEnv = {}) {
    this.proc = fork(dist(script), args, { env: { ...process.env, ...env }, stdio: ['ignore', 'inherit', 'pipe', 'ipc'] });
    this.proc.stderr?.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.proc.on('message', (m: Msg) => {
      const i = this.#waiting.findIndex((w) => w.pred(m));
      if (i >= 0) this.#waiting.splice(i, 1)[0]!.resolve(m);
      else this.#inbox.push(m);
    });
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    void this.exited.then(() => {
      for (const w of this.#waiting.splice(0)) w.reject(new Error(`child ${script} exited; stderr: ${this.stderr}`));
    });
  }

  send(m: object): void {
    this.proc.send(m);
  }

  next(kind: string | ((m: Msg) => boolean)): Promise<Msg> {
    const pred = typeof kind === 'string' ? (m: Msg) => m.kind === kind || m.kind === 'error' : kind;
    const i = this.#inbox.findIndex(pred);
    if (i >= 0) return Promise.resolve(this.#inbox.splice(i, 1)[0]!);
    return new Promise((resolve, reject) => this.#waiting.push({ pred, resolve, reject }));
  }

  async request(m: object, reply: string): Promise<Msg> {
    const p = this.next(reply);
    this.send(m);
    const r = await p;
    if (r.kind === 'error') throw new Error(String(r.message));
    return r;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    await this.exited;
  }
}

/** A fresh hypervisor directory for one test file, so parallel test files never share domids. */
export function freshXenDir(): string {
  return tempDir('test', '/dev/shm');
}
