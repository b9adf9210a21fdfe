// `vtpm top --run DIR`: a live table of the host's guests (transport, state, commands/s, p99 latency,
// last error), computed from the backend's metrics (RUN/metrics/backend.sock; docs/observability.md)
// by differencing two scrapes, as a Prometheus rate() and histogram_quantile() would.
import type { Command } from 'commander';
import { setTimeout as sleep } from 'node:timers/promises';
import { getFromSocket, metricsSocket } from '../util/metrics-http.js';
import { RunDir } from './rundir.js';
import { CliError } from './errors.js';
import { onStop } from './lifecycle.js';

interface Sample {
  labels: Record<string, string | number>;
  value: number;
  metricName?: string;
}
interface Family {
  name: string;
  values: Sample[];
}
type Scrape = { at: number; families: Map<string, Sample[]> };

export interface TopRow {
  domid: string;
  vm: string;
  transport: string;
  state: string;
  commandsPerSecond: number;
  /** Seconds; null when no command completed in the window (and none before). */
  p99: number | null;
  lastError: string | null;
}

async function scrape(run: string): Promise<Scrape> {
  let body: string;
  try {
    body = await getFromSocket(metricsSocket(run, 'backend'), '/metrics.json');
  } catch (err) {
    throw new CliError('HOST_DOWN', `cannot read the backend's metrics (${(err as Error).message}); is the host up (\`vtpm host status --run ${run}\`)?`);
  }
  const families = new Map<string, Sample[]>();
  for (const f of JSON.parse(body) as Family[]) families.set(f.name, f.values);
  return { at: Date.now(), families };
}

const key = (l: Record<string, string | number>): string => `${String(l.domid)}|${String(l.vm)}`;

function commandsOf(s: Scrape): Map<string, number> {
  const m = new Map<string, number>();
  for (const v of s.families.get('vtpm_commands_total') ?? []) m.set(key(v.labels), (m.get(key(v.labels)) ?? 0) + v.value);
  return m;
}

/** Cumulative bucket counts per guest: le -> count. */
function bucketsOf(s: Scrape): Map<string, Map<number, number>> {
  const m = new Map<string, Map<number, number>>();
  for (const v of s.families.get('vtpm_command_duration_seconds') ?? []) {
    if (v.metricName !== 'vtpm_command_duration_seconds_bucket') continue;
    const k = key(v.labels);
    const le = v.labels.le === '+Inf' ? Infinity : Number(v.labels.le);
    let b = m.get(k);
    if (!b) m.set(k, (b = new Map()));
    b.set(le, (b.get(le) ?? 0) + v.value);
  }
  return m;
}

/** histogram_quantile over cumulative buckets (linear within a bucket; the +Inf bucket gives its lower bound). */
export function quantile(q: number, buckets: Map<number, number>): number | null {
  const les = [...buckets.keys()].sort((a, b) => a - b);
  const total = buckets.get(Infinity) ?? (les.length ? buckets.get(les[les.length - 1]!)! : 0);
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const le of les) {
    const c = buckets.get(le)!;
    if (c >= rank) {
      if (le === Infinity) return prevLe;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / Math.max(c - prevCount, 1e-12);
    }
    prevLe = le;
    prevCount = c;
  }
  return prevLe;
}

/** The rows between two scrapes of the same backend (`before` may be null: cumulative figures). */
export function topRows(before: Scrape | null, now: Scrape): TopRow[] {
  const dt = before ? (now.at - before.at) / 1000 : 0;
  const c0 = before ? commandsOf(before) : new Map<string, number>();
  const c1 = commandsOf(now);
  const b0 = before ? bucketsOf(before) : new Map<string, Map<number, number>>();
  const b1 = bucketsOf(now);
  const errors = new Map<string, Sample>();
  for (const v of now.families.get('vtpm_guest_last_error_timestamp_seconds') ?? []) {
    const k = key(v.labels);
    if (!errors.has(k) || errors.get(k)!.value < v.value) errors.set(k, v);
  }
  const rows: TopRow[] = [];
  for (const g of now.families.get('vtpm_guest_info') ?? []) {
    const k = key(g.labels);
    const window = new Map<number, number>();
    for (const [le, n] of b1.get(k) ?? []) window.set(le, n - (b0.get(k)?.get(le) ?? 0));
    const p99 = quantile(0.99, window) ?? quantile(0.99, b1.get(k) ?? new Map());
    const e = errors.get(k);
    rows.push({
      domid: String(g.labels.domid),
      vm: String(g.labels.vm),
      transport: String(g.labels.transport),
      state: String(g.labels.state),
      commandsPerSecond: dt > 0 ? Math.max(0, (c1.get(k) ?? 0) - (c0.get(k) ?? 0)) / dt : 0,
      p99,
      lastError: e ? `${String(e.labels.error)} ${Math.max(0, Math.round(now.at / 1000 - e.value))} s ago` : null,
    });
  }
  return rows.sort((a, b) => Number(a.domid || 1e9) - Number(b.domid || 1e9) || a.vm.localeCompare(b.vm));
}

function fmtLatency(s: number | null): string {
  if (s === null) return '-';
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(1)} ms`;
  return `${s.toFixed(2)} s`;
}

export function formatTop(rows: TopRow[]): string[] {
  const head = ['GUEST', 'VM', 'TRANSPORT', 'STATE', 'CMD/S', 'P99', 'LAST ERROR'];
  const body = rows.map((r) => [
    r.domid ? `dom${r.domid}` : 'qemu',
    r.vm.slice(0, 8),
    r.transport,
    r.state,
    r.commandsPerSecond.toFixed(1),
    fmtLatency(r.p99),
    r.lastError ?? '-',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i === 4 || i === 5 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  return [line(head), ...body.map(line), ...(rows.length ? [] : ['(no guests)'])];
}

export function register(program: Command): void {
  program
    .command('top')
    .description('live table of the host\'s guests: transport, state, commands/s, p99 latency, last error (from the backend\'s metrics)')
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--interval <s>', 'seconds between refreshes', (v) => Number(v), 2)
    .option('--once', 'print one table (measured over one interval) and exit')
    .action(async (o: { run: string; interval: number; once?: boolean }) => {
      if (!(o.interval >= 0.1 && o.interval <= 3600)) throw new CliError('USAGE', '--interval takes seconds between 0.1 and 3600');
      const run = new RunDir(o.run).dir;
      let stop = false;
      onStop(() => {
        stop = true;
      });
      let before = await scrape(run);
      for (;;) {
        await sleep(o.interval * 1000);
        if (stop) return;
        const now = await scrape(run);
        const lines = formatTop(topRows(before, now));
        before = now;
        if (o.once) {
          console.log(lines.join('\n'));
          return;
        }
        process.stdout.write(`\x1b[H\x1b[2J${new Date().toISOString()}  ${run}\n${lines.join('\n')}\n`);
      }
    });
}
