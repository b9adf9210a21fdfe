// Starting the host's daemons as detached processes (they outlive `vtpm host up`), each logging to its
// own file, and waiting until each says it is ready.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { alive, type HostInfo } from './rundir.js';
import { domainLaunch, domainUid } from './isolation.js';
import { createDomainConnection } from '../xen/index.js';

export const MAIN_JS = join(dirname(fileURLToPath(import.meta.url)), 'main.js');

/**
 * V8 flags for every daemon and guest process started here: none by default. VTPM_DAEMON_V8_FLAGS
 * (space-separated, e.g. `--always-sparkplug`) sets them, for measuring what a flag does to a host's
 * first suspend cycles against its memory and warm CPU (docs/benchmarks.md "V8 flags and cold cycles").
 */
export function daemonV8Flags(env: NodeJS.ProcessEnv = process.env): string[] {
  return (env.VTPM_DAEMON_V8_FLAGS ?? '').split(/\s+/).filter((f) => f !== '');
}

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
  const child = spawn(process.execPath, [...daemonV8Flags(), ...prof, MAIN_JS, ...args], {
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

/**
 * Start `vtpm <args>` as guest domain `domid`, detached. The toolstack's part: create the domain at the
 * hypervisor and hand the guest its hypercall connection as fd 3 (VTPM_HV_FD), its log as stdout and
 * stderr. Under `isolation: uid` it runs as the domain's uid and opens no path of dom0's but its own
 * xenstore socket (docs/isolation.md).
 */
export async function spawnGuestProcess(h: HostInfo, domid: number, args: string[], log: string): Promise<ChildProcess> {
  fs.mkdirSync(dirname(log), { recursive: true, mode: 0o700 });
  const fd = fs.openSync(log, 'a', 0o600);
  let hvFd = -1;
  try {
    hvFd = await createDomainConnection({ domid, dir: h.xenDir });
    const l = domainLaunch(h.isolation, domid, 'guest', process.execPath, [...daemonV8Flags(), MAIN_JS, ...args]);
    // cwd /: the caller's working directory may be one the domain's uid cannot enter.
    const child = spawn(l.file, l.args, {
      detached: true,
      cwd: '/',
      stdio: ['ignore', fd, fd, hvFd],
      env: { ...process.env, VTPM_XEN_DIR: h.xenDir, VTPM_HV_FD: '3', VTPM_NO_SETUP: '1' },
    });
    child.unref();
    return child;
  } finally {
    fs.closeSync(fd);
    if (hvFd >= 0) fs.closeSync(hvFd);
  }
}

/** The uid that owns dom<N>'s files under `isolation: uid`, undefined otherwise. */
export function guestOwner(h: HostInfo, domid: number): number | undefined {
  return h.isolation?.mode === 'uid' ? domainUid(h.isolation, domid) : undefined;
}

/** The guest's own xenstore socket: passed on its command line so the guest never reads host.json. */
export function guestSocket(h: HostInfo, domid: number): string {
  return join(h.domainSocketDir, `dom${domid}.sock`);
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
