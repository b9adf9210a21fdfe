// `vtpm stress`: N guests run command streams (PCR extends of random digests, GetRandom, NV writes,
// key creation) while the harness suspends and resumes guests at random and kills (-9) guest
// processes, the backend and the manager, restarting each. Afterwards it checks, from the guests'
// journals and their final PCR/NV reads: every command answered exactly once (one answer per command,
// one id per command), the PCR equal to the SHA-256 model of the acknowledged extends, the NV index
// holding the last acknowledged write. A command counts as acknowledged only once its guest holds the
// response (the journal's "ack"); a backend dying mid-command leaves it unacknowledged, and the guest
// resubmits it under the same id.
import type { Command } from 'commander';
import fs from 'node:fs';
import os from 'node:os';
import { createHash } from 'node:crypto';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RunDir, alive } from './rundir.js';
import { hostDown, hostUp } from './host.js';
import { guestAttach } from './guest.js';
import { guestResume, guestSuspend } from './suspend.js';
import { restartDaemon } from './restart.js';
import { readJournal, journalPath, streamLength, type JournalLine, type WorkloadSpec } from './stress-workload.js';
import * as tpm2 from '../tpm/tpm2-commands.js';

export interface StressOptions {
  guests: number;
  commands: number;
  suspendEvery: number;
  /** 0 = no kills. */
  killEvery: number;
  seed: number;
  json?: string;
  html?: string;
  run?: string;
  timeoutMs?: number;
  progress?: boolean;
}

export interface FaultEvent {
  kind: 'suspend' | 'kill-guest' | 'kill-backend' | 'kill-manager';
  target: string;
  /** ms since the start of the run. */
  at: number;
  /** suspend: suspend ms; kills: time to restart. */
  ms: number;
  /** suspend: resume ms. */
  resumeMs?: number;
}

export interface StressReport {
  guests: number;
  commands: number;
  seed: number;
  suspendEvery: number;
  killEvery: number;
  durationMs: number;
  answered: number;
  violations: number;
  violationDetails: string[];
  faults: FaultEvent[];
  latency: { p50: number; p99: number; max: number };
  suspendMs: { p50: number; p99: number };
  resumeMs: { p50: number; p99: number };
  perGuest: { domid: number; answered: number; extends: number; nvWrites: number; pcrOk: boolean; nvOk: boolean }[];
  samples: { at: number; ms: number; domid: number }[];
}

/** A small deterministic PRNG (mulberry32) so a seed replays the same fault schedule choices. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pct = (xs: number[], p: number): number => {
  if (!xs.length) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};

const vmOf = (seed: number, domid: number): string => {
  const h = createHash('sha256').update(`vm/${seed}/${domid}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
};

/** Check one guest's journal; returns its violations. */
export function checkGuest(spec: WorkloadSpec, domid: number, lines: JournalLine[]): { violations: string[]; answered: number; extends: number; nvWrites: number; pcrOk: boolean; nvOk: boolean } {
  const v: string[] = [];
  const total = streamLength(spec);
  const acks = new Map<number, JournalLine[]>();
  const ids = new Map<number, Set<string>>();
  for (const l of lines) {
    if (l.t === 'ack') acks.set(l.s, [...(acks.get(l.s) ?? []), l]);
    if ((l.t === 'sent' || l.t === 'ack') && l.id !== undefined) ids.set(l.s, (ids.get(l.s) ?? new Set()).add(l.id));
  }
  const sent = new Map<number, JournalLine>();
  for (const l of lines) if (l.t === 'sent' && !sent.has(l.s)) sent.set(l.s, l);
  let model = Buffer.alloc(32);
  let nv: string | null = null;
  let extendsN = 0;
  let nvWrites = 0;
  let pcr: string | null = null;
  let nvRead: string | null = null;
  for (let s = 0; s < total; s++) {
    const a = acks.get(s) ?? [];
    if (a.length !== 1) {
      v.push(`dom${domid}: command ${s} answered ${a.length} times`);
      continue;
    }
    if ((ids.get(s)?.size ?? 0) !== 1) v.push(`dom${domid}: command ${s} went out under ${ids.get(s)?.size ?? 0} ids (${[...(ids.get(s) ?? [])].join(',')})`);
    const ack = a[0]!;
    const d = sent.get(s)?.d;
    if (ack.op === 'extend' && ack.rc === 0 && d) {
      model = createHash('sha256').update(Buffer.concat([model, Buffer.from(d, 'hex')])).digest();
      extendsN++;
    }
    if (ack.op === 'nvwrite' && ack.rc === 0 && d) {
      nv = d;
      nvWrites++;
    }
    if (ack.op === 'pcrread' && ack.r) pcr = Buffer.from(tpm2.parsePcrRead(Buffer.from(ack.r, 'hex'))).toString('hex');
    if (ack.op === 'nvread' && ack.r && ack.rc === 0) nvRead = Buffer.from(tpm2.parseNvRead(Buffer.from(ack.r, 'hex'))).toString('hex');
    if ((ack.op === 'extend' || ack.op === 'nvwrite' || ack.op === 'random') && ack.rc !== 0) v.push(`dom${domid}: command ${s} (${ack.op}) answered 0x${(ack.rc ?? 0).toString(16)}`);
  }
  const pcrOk = pcr === model.toString('hex');
  if (!pcrOk) v.push(`dom${domid}: PCR16 is ${pcr}, the model of ${extendsN} acknowledged extends is ${model.toString('hex')}`);
  const nvOk = nv === null || nvRead === nv;
  if (!nvOk) v.push(`dom${domid}: NV index holds ${nvRead}, last acknowledged write was ${nv}`);
  return { violations: v, answered: [...acks.values()].filter((a) => a.length >= 1).length, extends: extendsN, nvWrites, pcrOk, nvOk };
}

/** Wait (up to 30 s) until every guest's device is Connected on both sides again. */
async function settle(run: string, domids: number[]): Promise<void> {
  const { connect } = await import('../xenstore/client.js');
  const xs = await connect(new RunDir(run).readHost().xenstoredSocket);
  try {
    const deadline = Date.now() + 30_000;
    for (const d of domids) {
      while (Date.now() < deadline) {
        const [f, b] = await Promise.all([
          xs.tryRead(`/local/domain/${d}/device/vtpm/0/state`),
          xs.tryRead(`/local/domain/0/backend/vtpm/${d}/0/state`),
        ]);
        if (f === '4' && b === '4') break;
        await sleep(10);
      }
    }
  } finally {
    await xs.close();
  }
}

export async function stress(o: StressOptions): Promise<StressReport> {
  const rand = prng(o.seed);
  const own = o.run === undefined;
  const base = own ? fs.mkdtempSync(join(os.tmpdir(), 'vtpm-stress-')) : resolve(o.run!, '..');
  const run = own ? join(base, 'run') : resolve(o.run!);
  if (own) await hostUp(run, join(base, 'state'), 'single');
  const rd = new RunDir(run);
  const spec: WorkloadSpec = { seed: o.seed, commands: o.commands, journalDir: join(run, 'stress') };
  fs.rmSync(spec.journalDir, { recursive: true, force: true });
  fs.mkdirSync(spec.journalDir, { recursive: true });
  const specFile = join(spec.journalDir, 'workload.json');
  fs.writeFileSync(specFile, JSON.stringify(spec));
  const domids = Array.from({ length: o.guests }, (_, i) => 100 + i);
  const faults: FaultEvent[] = [];
  const total = streamLength(spec) * o.guests;
  const t0 = Date.now();
  let bar: { update(n: number, p?: object): void; stop(): void } | null = null;
  try {
    for (const d of domids) await guestAttach({ run, domid: d, vm: vmOf(o.seed, d), protocol: 'ring', workload: specFile });
    if (o.progress ?? process.stdout.isTTY) {
      const { SingleBar, Presets } = (await import('cli-progress')).default;
      const b = new SingleBar({ format: 'stress [{bar}] {value}/{total} answered | {faults} faults | {eta_formatted} left', hideCursor: true }, Presets.shades_classic);
      b.start(total, 0, { faults: 0 });
      bar = b;
    }
    const count = (): { acked: number; done: number } => {
      let acked = 0;
      let done = 0;
      for (const d of domids) {
        let text = '';
        try {
          text = fs.readFileSync(journalPath(spec, d), 'utf8');
        } catch {
          continue;
        }
        acked += text.split('"t":"ack"').length - 1;
        if (text.includes('"t":"done"')) done++;
      }
      return { acked, done };
    };
    let nextSuspend = o.suspendEvery > 0 ? o.suspendEvery : Infinity;
    let nextKill = o.killEvery > 0 ? o.killEvery : Infinity;
    const deadline = t0 + (o.timeoutMs ?? 600_000);
    for (;;) {
      const { acked, done } = count();
      bar?.update(Math.min(acked, total), { faults: faults.length });
      if (done === domids.length) break;
      if (Date.now() > deadline) throw new Error(`stress: not finished after ${o.timeoutMs ?? 600_000} ms (${acked}/${total} answered)`);
      // Guests whose workload is not done are the ones worth hitting.
      const live = domids.filter((d) => !fs.existsSync(journalPath(spec, d)) || !fs.readFileSync(journalPath(spec, d), 'utf8').includes('"t":"done"'));
      if (acked >= nextKill && live.length) {
        // Counted from now: one fault per interval even when answers arrived faster than we looked.
        nextKill = acked + o.killEvery;
        const r = rand();
        const at = Date.now() - t0;
        const k0 = performance.now();
        if (r < 0.5) {
          const d = live[Math.floor(rand() * live.length)]!;
          const g = rd.readGuest(d)!;
          process.kill(g.pid, 'SIGKILL');
          for (let i = 0; i < 500 && alive(g.pid, g.start); i++) await sleep(5);
          await guestResume({ run, domid: d });
          faults.push({ kind: 'kill-guest', target: `dom${d}`, at, ms: performance.now() - k0 });
        } else {
          const role = r < 0.75 ? 'backend' : 'manager';
          const p = rd.readHost().processes.find((q) => q.role === role)!;
          process.kill(p.pid, 'SIGKILL');
          await restartDaemon(run, role);
          faults.push({ kind: role === 'backend' ? 'kill-backend' : 'kill-manager', target: role, at, ms: performance.now() - k0 });
        }
        // One fault at a time: let every guest reconnect before the next one (overlapping a suspend
        // with a backend's recovery is not exercised; see docs/suspend-and-stress.md).
        // (A restarted backend rewrites each device's state within a few ms of being ready; before
        // that the dead one's Connected is still there.)
        await sleep(300);
        await settle(run, domids);
        continue;
      }
      if (acked >= nextSuspend && live.length) {
        nextSuspend = acked + o.suspendEvery;
        const d = live[Math.floor(rand() * live.length)]!;
        const at = Date.now() - t0;
        const s = await guestSuspend(run, d);
        const r = await guestResume({ run, domid: d });
        faults.push({ kind: 'suspend', target: `dom${d}`, at, ms: s.ms, resumeMs: r.ms });
        continue;
      }
      await sleep(25);
    }
  } catch (err) {
    bar?.stop();
    if (own) await hostDown(run).catch(() => {});
    throw err;
  } finally {
    bar?.stop();
  }
  const durationMs = Date.now() - t0;
  // Check the journals.
  const details: string[] = [];
  const perGuest: StressReport['perGuest'] = [];
  const samples: StressReport['samples'] = [];
  const lat: number[] = [];
  let answered = 0;
  for (const d of domids) {
    const lines = readJournal(journalPath(spec, d));
    const c = checkGuest(spec, d, lines);
    details.push(...c.violations);
    answered += c.answered;
    perGuest.push({ domid: d, answered: c.answered, extends: c.extends, nvWrites: c.nvWrites, pcrOk: c.pcrOk, nvOk: c.nvOk });
    for (const l of lines) {
      if (l.t !== 'ack' || l.ms === undefined || l.at === undefined) continue;
      lat.push(l.ms);
      samples.push({ at: l.at - t0, ms: l.ms, domid: d });
    }
  }
  if (own) await hostDown(run).catch(() => {});
  const susp = faults.filter((f) => f.kind === 'suspend');
  const report: StressReport = {
    guests: o.guests,
    commands: o.commands,
    seed: o.seed,
    suspendEvery: o.suspendEvery,
    killEvery: o.killEvery,
    durationMs,
    answered,
    violations: details.length,
    violationDetails: details,
    faults,
    latency: { p50: pct(lat, 50), p99: pct(lat, 99), max: Math.max(0, ...lat) },
    suspendMs: { p50: pct(susp.map((f) => f.ms), 50), p99: pct(susp.map((f) => f.ms), 99) },
    resumeMs: { p50: pct(susp.map((f) => f.resumeMs ?? 0), 50), p99: pct(susp.map((f) => f.resumeMs ?? 0), 99) },
    perGuest,
    samples,
  };
  if (o.json) fs.writeFileSync(o.json, JSON.stringify({ ...report, samples: undefined }, null, 2) + '\n');
  if (o.html) fs.writeFileSync(o.html, htmlReport(report));
  if (own && report.violations === 0) fs.rmSync(base, { recursive: true, force: true });
  return report;
}

export function table(r: StressReport): string {
  const rows: [string, string][] = [
    ['guests × commands', `${r.guests} × ${r.commands} (+4 setup/check each)`],
    ['answered', String(r.answered)],
    ['duration', `${(r.durationMs / 1000).toFixed(1)} s`],
    ['suspend/resume cycles', String(r.faults.filter((f) => f.kind === 'suspend').length)],
    ['guest kills', String(r.faults.filter((f) => f.kind === 'kill-guest').length)],
    ['backend kills', String(r.faults.filter((f) => f.kind === 'kill-backend').length)],
    ['manager kills', String(r.faults.filter((f) => f.kind === 'kill-manager').length)],
    ['latency p50 / p99 / max', `${r.latency.p50.toFixed(2)} / ${r.latency.p99.toFixed(2)} / ${r.latency.max.toFixed(0)} ms`],
    ['suspend p50 / p99', `${r.suspendMs.p50.toFixed(1)} / ${r.suspendMs.p99.toFixed(1)} ms`],
    ['resume p50 / p99', `${r.resumeMs.p50.toFixed(1)} / ${r.resumeMs.p99.toFixed(1)} ms`],
    ['PCR == model', `${r.perGuest.filter((g) => g.pcrOk).length}/${r.guests}`],
    ['NV == last write', `${r.perGuest.filter((g) => g.nvOk).length}/${r.guests}`],
    ['violations', String(r.violations)],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n');
}

const esc = (s: string): string => s.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);

/** A self-contained page: inline SVG charts, no scripts or external resources. */
export function htmlReport(r: StressReport): string {
  const W = 900;
  const H = 260;
  const pad = 40;
  const maxT = Math.max(1, r.durationMs);
  const step = Math.max(1, Math.ceil(r.samples.length / 4000));
  const pts = r.samples.filter((_, i) => i % step === 0);
  const maxMs = Math.max(1, pct(r.samples.map((s) => s.ms), 99.9));
  const x = (t: number): number => pad + ((W - 2 * pad) * t) / maxT;
  const y = (ms: number): number => H - pad - ((H - 2 * pad) * Math.min(ms, maxMs)) / maxMs;
  const dots = pts.map((p) => `<circle cx="${x(p.at).toFixed(1)}" cy="${y(p.ms).toFixed(1)}" r="1.2"/>`).join('');
  const colour = { suspend: '#1f77b4', 'kill-guest': '#ff7f0e', 'kill-backend': '#d62728', 'kill-manager': '#9467bd' } as const;
  const marks = r.faults
    .map((f) => `<line x1="${x(f.at).toFixed(1)}" x2="${x(f.at).toFixed(1)}" y1="${pad}" y2="${H - pad}" stroke="${colour[f.kind]}" stroke-opacity="0.6"><title>${f.kind} ${esc(f.target)}</title></line>`)
    .join('');
  const susp = r.faults.filter((f) => f.kind === 'suspend');
  const maxS = Math.max(1, ...susp.map((f) => f.ms + (f.resumeMs ?? 0)));
  const bw = Math.max(2, Math.min(30, (W - 2 * pad) / Math.max(1, susp.length)));
  const bars = susp
    .map((f, i) => {
      const hs = ((H - 2 * pad) * f.ms) / maxS;
      const hr = ((H - 2 * pad) * (f.resumeMs ?? 0)) / maxS;
      const bx = pad + i * bw;
      return `<rect x="${bx}" y="${H - pad - hs}" width="${bw - 1}" height="${hs}" fill="#1f77b4"><title>suspend ${f.ms.toFixed(1)} ms</title></rect><rect x="${bx}" y="${H - pad - hs - hr}" width="${bw - 1}" height="${hr}" fill="#2ca02c"><title>resume ${(f.resumeMs ?? 0).toFixed(1)} ms</title></rect>`;
    })
    .join('');
  const axis = (label: string, top: string): string =>
    `<line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#000"/><line x1="${pad}" y1="${pad}" x2="${pad}" y2="${H - pad}" stroke="#000"/><text x="${pad}" y="${pad - 8}" font-size="11">${esc(top)}</text><text x="${W - pad}" y="${H - 8}" font-size="11" text-anchor="end">${esc(label)}</text>`;
  return `<!doctype html><html><head><meta charset="utf-8"><title>vtpm stress report</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}td{padding:2px 10px;border-bottom:1px solid #ddd}.bad{color:#b00}</style></head><body>
<h1>vtpm stress: ${r.violations === 0 ? 'no violations' : `<span class="bad">${r.violations} violations</span>`}</h1>
<pre>${esc(table(r))}</pre>
<h2>Command latency over time</h2>
<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}">${axis(`time (0–${(maxT / 1000).toFixed(1)} s)`, `latency, 0–${maxMs.toFixed(0)} ms`)}${marks}<g fill="#333">${dots}</g></svg>
<p>Vertical lines: <span style="color:${colour.suspend}">suspend/resume</span>, <span style="color:${colour['kill-guest']}">guest killed</span>, <span style="color:${colour['kill-backend']}">backend killed</span>, <span style="color:${colour['kill-manager']}">manager killed</span>.</p>
<h2>Suspend and resume timings</h2>
<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}">${axis(`${susp.length} cycles`, `suspend (blue) + resume (green), 0–${maxS.toFixed(0)} ms`)}${bars}</svg>
<h2>Per guest</h2><table><tr><td>domid</td><td>answered</td><td>extends</td><td>NV writes</td><td>PCR</td><td>NV</td></tr>
${r.perGuest.map((g) => `<tr><td>${g.domid}</td><td>${g.answered}</td><td>${g.extends}</td><td>${g.nvWrites}</td><td>${g.pcrOk ? 'ok' : '<b class="bad">MISMATCH</b>'}</td><td>${g.nvOk ? 'ok' : '<b class="bad">MISMATCH</b>'}</td></tr>`).join('\n')}</table>
${r.violationDetails.length ? `<h2>Violations</h2><pre>${esc(r.violationDetails.join('\n'))}</pre>` : ''}
</body></html>
`;
}

const int = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`not a non-negative integer: ${v}`);
  return n;
};

export function register(program: Command): void {
  program
    .command('stress')
    .description('guests issue commands while guests are suspended/resumed and processes are killed; checks exactly-once')
    .option('--guests <n>', 'guest domains', int, 8)
    .option('--commands <m>', 'commands per guest', int, 250)
    .option('--suspend-every <k>', 'suspend+resume a random guest every K answered commands (0: never)', int, 50)
    .option('--kill-every <k>', 'kill -9 a guest, the backend or the manager every K answered commands (0: never)', int, 0)
    .option('--seed <s>', 'seed of the command streams and fault choices', int, 1)
    .option('--json <file>', 'write the report as JSON (with a violations count)')
    .option('--html <file>', 'write an offline HTML report (inline SVG)')
    .option('--run <dir>', 'use this running host instead of starting one in a temp dir')
    .option('--timeout <ms>', 'give up after this long', int, 600_000)
    .action(async (o: { guests: number; commands: number; suspendEvery: number; killEvery: number; seed: number; json?: string; html?: string; run?: string; timeout: number }) => {
      if (o.guests < 1 || o.guests > 200) throw new Error('--guests must be 1..200');
      const r = await stress({ ...o, timeoutMs: o.timeout });
      console.log(table(r));
      for (const v of r.violationDetails.slice(0, 20)) console.log(`violation: ${v}`);
      if (r.violations > 0) process.exitCode = 1;
    });
}
