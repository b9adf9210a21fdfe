// Starting the host's daemons as detached processes (they outlive `vtpm host up`), each logging to its
// own file, and waiting until each says it is ready.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { alive } from './rundir.js';

export const MAIN_JS = join(dirname(fileURLToPath(import.meta.url)), 'main.js');

export interface Started {
  pid: number;
  log: string;
}

/** Run `vtpm <args>` detached, stdout and stderr appended to `log`; wait for `ready` to appear in it. */
export async function startDaemon(args: string[], log: string, ready: RegExp, env: NodeJS.ProcessEnv = {}, timeoutMs = 30_000): Promise<Started> {
  fs.mkdirSync(dirname(log), { recursive: true });
  const start = fs.existsSync(log) ? fs.statSync(log).size : 0;
  const fd = fs.openSync(log, 'a');
  // VTPM_CPU_PROF_DIR: every daemon writes a V8 CPU profile there when it exits (node --cpu-prof is not
  // allowed in NODE_OPTIONS, so it has to go on the command line).
  const prof = process.env.VTPM_CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${process.env.VTPM_CPU_PROF_DIR}`] : [];
  const child = spawn(process.execPath, [...prof, MAIN_JS, ...args], {
    detached: true,
    stdio: ['ignore', fd, fd],
    env: { ...process.env, ...env, VTPM_NO_SETUP: '1' },
  });
  fs.closeSync(fd);
  child.unref();
  const pid = child.pid ?? -1;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = readFrom(log, start);
    if (ready.test(text)) return { pid, log };
    if (!alive(pid)) throw new Error(`vtpm ${args[0]} exited during start-up:\n${tail(text)}`);
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGKILL');
      throw new Error(`vtpm ${args[0]} not ready after ${timeoutMs} ms:\n${tail(text)}`);
    }
    await sleep(20);
  }
}

function readFrom(file: string, offset: number): string {
  try {
    const b = fs.readFileSync(file);
    return b.subarray(offset).toString();
  } catch {
    return '';
  }
}

export function tail(text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

export function tailFile(file: string, lines = 20): string {
  return tail(readFrom(file, 0), lines);
}

/** SIGTERM, wait up to `graceMs` for the process to exit, then SIGKILL. Resolves true if it exited cleanly. */
export async function stopProcess(pid: number, graceMs = 15_000): Promise<boolean> {
  if (!alive(pid)) return true;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return true;
  }
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    if (!alive(pid)) return true;
    await sleep(20);
  }
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
  return false;
}
