// Shared pieces of every benchmark: figures, percentiles, machine facts and the report format
// `{"bench", "date", "machine", "figures": [{id, unit, ours, peer, ratio}]}` of the bench harness.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface Figure {
  id: string;
  unit: string;
  ours: number;
  peer: number;
  /** ours / peer, computed by the harness so every bench reports it the same way. */
  ratio?: number;
  /** What "peer" was in this run (e.g. "swtpm 0.7.3 socket"), shown in the table. */
  note?: string;
  /** The goal this figure is held to; figures with one make the headline table of docs/benchmarks.md. */
  target?: Target;
}

/** A goal on a figure: `ratio <= 0.5`, `ours <= 5` (in the figure's unit), … */
export interface Target {
  on: 'ratio' | 'ours';
  op: '<=' | '>=';
  value: number;
}

/** How busy the machine was while a bench ran: Linux CPU pressure (PSI some avg10, %) and load average. */
export interface Conditions {
  psiStart: number | null;
  psiEnd: number | null;
  loadStart: number;
  loadEnd: number;
}

export interface BenchContext {
  /** Arguments after the bench name that the harness did not consume (e.g. `--mode multi`). */
  args: string[];
  log: (line: string) => void;
}

export interface BenchModule {
  run(ctx: BenchContext): Promise<Figure[]>;
}

export interface BenchReport {
  bench: string;
  date: string;
  machine: { cpus: number; model: string; node: string; memGiB: number; kernel: string };
  conditions?: Conditions;
  figures: Array<Required<Omit<Figure, 'note' | 'target'>> & { note?: string; target?: Target }>;
}

/** CPU pressure now (PSI some avg10, %), or null without /proc/pressure. */
export function cpuPressure(): number | null {
  try {
    const m = /some avg10=([\d.]+)/.exec(fs.readFileSync('/proc/pressure/cpu', 'latin1'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

export function machine(): BenchReport['machine'] {
  const cpus = os.cpus();
  return {
    cpus: cpus.length,
    model: cpus[0]?.model.trim() ?? 'unknown',
    node: process.version,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
  };
}

/** Nearest-rank percentile of an unsorted sample (p in 0..100). */
export function percentile(sample: ArrayLike<number>, p: number): number {
  const s = Float64Array.from(sample as ArrayLike<number>).sort();
  if (s.length === 0) return NaN;
  const rank = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[rank]!;
}

export function median(sample: ArrayLike<number>): number {
  return percentile(sample, 50);
}

/** Microseconds elapsed since a process.hrtime.bigint() reading. */
export function usSince(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1000;
}

export function round(x: number, digits = 3): number {
  if (!Number.isFinite(x)) return x;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

export function table(report: BenchReport): string {
  const m = report.machine;
  const head = `bench ${report.bench} — ${report.date} — ${m.cpus}× ${m.model}, ${m.memGiB} GiB, Node ${m.node}, Linux ${m.kernel}`;
  const rows = report.figures.map((f) => [f.id, f.unit, fmt(f.ours), fmt(f.peer), fmt(f.ratio), f.note ?? '']);
  const header = ['figure', 'unit', 'ours', 'peer', 'ratio', 'peer is'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  return [head, '', line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...rows.map(line)].join('\n');
}

export function fmt(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  if (Math.abs(x) >= 1000) return x.toFixed(0);
  if (Math.abs(x) >= 10) return x.toFixed(1);
  return x.toFixed(3);
}

/**
 * CPU time a process has used so far, in µs, from /proc/<pid>/schedstat (nanoseconds on the CPU; finer
 * than utime/stime's 10 ms ticks). Benches that poll shared memory report it so the CPU a poll burns is
 * in the table next to the latency it buys.
 */
export function cpuUs(pid: number | 'self'): number {
  const text = fs.readFileSync(`/proc/${pid}/schedstat`, 'utf8');
  return Number(text.split(' ')[0]) / 1000;
}

/** CPU time (ns) of every thread of process `pid` so far, from /proc/PID/task/TID/schedstat. */
export function cpuNsAllThreads(pid: number): number {
  let ns = 0;
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'latin1').split(' ')[0]);
    } catch {
      // the thread ended meanwhile
    }
  }
  return ns;
}

/**
 * Wait (up to `maxMs`) until CPU pressure (PSI some avg10) is at most half the share at which our pollers
 * stand down (poll.ts: 10 %). Starting a host is a burst of process start-ups whose pressure lingers in
 * the kernel's 10-second average, and a measurement adds its own: one that starts just under the limit
 * crosses it within seconds and measures a path whose polling stood down part of the way. Both sides of
 * a comparison are measured after the wait. Returns the ms waited.
 */
export async function settle(ctx: BenchContext, maxMs = 60_000): Promise<number> {
  const quiet = (): boolean => (cpuPressure() ?? 0) <= SETTLED_PSI;
  const t0 = performance.now();
  while (!quiet() && performance.now() - t0 < maxMs) await new Promise((r) => setTimeout(r, 250));
  const waited = performance.now() - t0;
  if (waited > 1) ctx.log(`waited ${(waited / 1000).toFixed(1)} s for CPU pressure to settle${quiet() ? '' : ' (still contended)'}`);
  return waited;
}

/** The CPU pressure (%) a measurement starts under at most: half of poll.ts's stand-down limit. */
const SETTLED_PSI = 5;

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'cli', 'main.js');

/** A `vtpm manager` process as a user runs it, once it says ready; its final stats go to stderr under `tag`. */
export async function startManager(tag: string, stateDir: string, runDir: string, extra: string[]): Promise<{ stop(): Promise<void> }> {
  const p = spawn(process.execPath, [CLI, 'manager', '--state', stateDir, '--run', runDir, ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, UV_THREADPOOL_SIZE: '64' }, // as scripts/vtpm runs it
  });
  await new Promise<void>((resolve, reject) => {
    let log = '';
    p.stderr.on('data', (d: Buffer) => {
      log += d.toString();
      if (/ready\n/.test(log)) resolve();
      const stats = /stopped \((.*)\)/.exec(log);
      if (stats) process.stderr.write(`[${tag}]   manager: ${stats[1]}\n`);
    });
    p.on('exit', (c) => reject(new Error(`manager exited with ${c}: ${log}`)));
  });
  return {
    stop: () =>
      new Promise<void>((r) => {
        p.removeAllListeners('exit');
        p.on('exit', () => r());
        p.kill('SIGTERM');
      }),
  };
}

/** Where a round trip's two ends run: on different vCPUs, or both on one. */
export type Placement = 'apart' | 'shared';
export const PLACEMENTS: readonly Placement[] = ['apart', 'shared'];

/**
 * Pin every thread of the client processes to vCPU 0 and of the server processes to vCPU 1 (`apart`)
 * or to vCPU 0 too (`shared`); returns the undo (every thread back on every vCPU). On this kind of VM
 * a socket round trip costs a few µs on one vCPU and tens of µs across two (docs/benchmarks.md, "Why the
 * peer's figure moves"), so a ratio is stated per placement, ours and the peer's pinned alike.
 * Returns null on a machine with a single CPU, where `apart` does not exist.
 */
export function pin(placement: Placement, clients: number[], servers: number[]): (() => void) | null {
  const n = os.cpus().length;
  if (n < 2) return null;
  const set = (cpus: string, pids: number[]): void => {
    for (const pid of pids) execFileSync('taskset', ['-a', '-p', '-c', cpus, String(pid)], { stdio: 'ignore' });
  };
  set('0', clients);
  set(placement === 'apart' ? '1' : '0', servers);
  return () => set(`0-${n - 1}`, [...clients, ...servers]);
}

/**
 * Round trips of `ours` and `peer` at each placement (`pids`: the client and server processes of each
 * side), alternating in rounds so machine noise hits both alike; p50 in µs per placement.
 */
export async function placedMedians(
  ctx: BenchContext,
  sides: { ours: { servers: number[]; rtt: (n: number) => Promise<number[]> }; peer: { servers: number[]; rtt: (n: number) => Promise<number[]> }; clients: number[] },
  n: number,
): Promise<Map<Placement, { ours: number; peer: number }>> {
  const out = new Map<Placement, { ours: number; peer: number }>();
  for (const placement of PLACEMENTS) {
    const undo = pin(placement, sides.clients, [...sides.ours.servers, ...sides.peer.servers]);
    if (!undo) break;
    try {
      await sides.ours.rtt(200);
      await sides.peer.rtt(200);
      const o: number[] = [];
      const p: number[] = [];
      for (let round = 0; round < 4; round++) {
        o.push(...(await sides.ours.rtt(n / 4)));
        p.push(...(await sides.peer.rtt(n / 4)));
      }
      out.set(placement, { ours: median(o), peer: median(p) });
      ctx.log(`placement ${placement}: ours ${median(o).toFixed(1)} µs, peer ${median(p).toFixed(1)} µs`);
    } finally {
      undo();
    }
  }
  return out;
}
