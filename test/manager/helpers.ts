// Spawns the real manager (`node dist/src/cli/main.js manager`) and collects its log lines.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, expect } from 'vitest';
import { ManagerClient } from '../../src/manager/client.js';
import { CONSOLE_IN, CONSOLE_OUT, openReader, writeShared } from '../../src/manager/fifo.js';
import { SealError } from '../../src/manager/seal.js';
import { tempDir, removeDir } from '../helpers/temp.js';

export const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = path.join(ROOT, 'dist/src/cli/main.js');
export const DIST_MANAGER = path.join(ROOT, 'dist/src/manager');

export interface RunningManager {
  proc: ChildProcess;
  log: string[];
  stateDir: string;
  runDir: string;
  /** Resolves with the first log line matching re (already seen lines count). */
  waitLog(re: RegExp, timeoutMs?: number): Promise<string>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export async function startManager(stateDir: string, runDir: string, extra: string[] = []): Promise<RunningManager> {
  const proc = spawn(process.execPath, [CLI, 'manager', '--state', stateDir, '--run', runDir, ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, UV_THREADPOOL_SIZE: '64' }, // what scripts/vtpm sets
  });
  const log: string[] = [];
  const waiters: Array<{ re: RegExp; resolve: (l: string) => void }> = [];
  let buf = '';
  proc.stderr!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      log.push(line);
      for (const w of [...waiters]) if (w.re.test(line)) (waiters.splice(waiters.indexOf(w), 1), w.resolve(line));
    }
  });
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const m: RunningManager = {
    proc,
    log,
    stateDir,
    runDir,
    waitLog(re, timeoutMs = 20_000) {
      const seen = log.find((l) => re.test(l));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no log line ${re} within ${timeoutMs} ms; log:\n${log.join('\n')}`)), timeoutMs);
        waiters.push({ re, resolve: (l) => (clearTimeout(t), resolve(l)) });
        void exited.then(() => reject(new Error(`manager exited before logging ${re}; log:\n${log.join('\n')}`)));
      });
    },
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
  await m.waitLog(/ready$/);
  return m;
}

/**
 * The managers and clients one test file starts: every client disconnected and every manager killed
 * after each test. `manager()` starts one and tracks it; push clients onto `clients`.
 */
export function perTest(): {
  managers: RunningManager[];
  clients: ManagerClient[];
  manager: (stateDir?: string, runDir?: string) => Promise<RunningManager>;
} {
  const managers: RunningManager[] = [];
  const clients: ManagerClient[] = [];
  const dirs = new Set<string>();
  afterEach(async () => {
    for (const c of clients.splice(0)) c.disconnect();
    for (const m of managers.splice(0)) await m.stop('SIGKILL');
    for (const d of dirs) removeDir(d);
    dirs.clear();
  });
  const manager = async (stateDir?: string, runDir?: string): Promise<RunningManager> => {
    const tmp = (tag: string): string => {
      const d = tempDir(tag);
      dirs.add(d);
      return d;
    };
    const m = await startManager(stateDir ?? tmp('state'), runDir ?? tmp('run'));
    managers.push(m);
    return m;
  };
  return { managers, clients, manager };
}

/**
 * One real manager at a time that a test kills -9 and starts again on the same directories: `start`
 * runs it and connects a client (`reconnect` as ManagerClient.connect takes it); after each test every
 * client is cut and the manager killed. `now()` is the manager running at the moment; push other
 * clients onto `clients`.
 */
export function restartable(opts: { reconnect?: boolean } = {}): {
  start: (stateDir: string, runDir: string, extra?: string[]) => Promise<ManagerClient>;
  now: () => RunningManager;
  clients: ManagerClient[];
} {
  let running: RunningManager | null = null;
  const clients: ManagerClient[] = [];
  afterEach(async () => {
    for (const c of clients.splice(0)) c.disconnect();
    await running?.stop('SIGKILL');
    running = null;
  });
  const start = async (stateDir: string, runDir: string, extra: string[] = []): Promise<ManagerClient> => {
    running = await startManager(stateDir, runDir, extra);
    const c = await ManagerClient.connect(runDir, opts.reconnect === undefined ? {} : { reconnect: opts.reconnect });
    clients.push(c);
    return c;
  };
  const now = (): RunningManager => {
    if (!running) throw new Error('no manager is running');
    return running;
  };
  return { start, now, clients };
}

/** One raw exchange on the console FIFOs, as a Xen hotplug script or vtpm_migrator does it: write one frame, read the reply bytes. */
export async function rawConsole(runDir: string, frame: Buffer): Promise<Buffer> {
  const r = openReader(path.join(runDir, CONSOLE_OUT));
  try {
    const got = new Promise<Buffer>((resolve) => {
      let acc = Buffer.alloc(0);
      r.on('data', (c: Buffer) => {
        acc = Buffer.concat([acc, c]);
        if (acc.length >= 14 && acc.length >= 4 + acc.readUInt32BE(6)) resolve(acc);
      });
    });
    writeShared(path.join(runDir, CONSOLE_IN), frame);
    return await got;
  } finally {
    r.destroy();
  }
}

/** The code of the SealError `fn` throws (any other error fails the test; so does no error). */
export function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(SealError);
    return (e as SealError).code;
  }
  throw new Error('accepted');
}
