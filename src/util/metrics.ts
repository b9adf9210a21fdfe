// Prometheus metrics of this process (docs/observability.md). Every daemon keeps one registry, labelled
// with its role, and serves it on a UNIX socket in the run directory; the backend merges them all for
// `host up --metrics HOST:PORT` (metrics-http.ts) and `vtpm top` reads the same sockets. Each role's
// metrics are created the first time that role asks for them, so a process exports only its own.
// Labels take bounded values only: domid, vm (one per guest), transport, TPM command names from a fixed
// table, outcome and reason names from fixed sets, never request ids or guest strings.
import { createRequire } from 'node:module';
import type * as Prom from 'prom-client';
import { procUsage } from './proc.js';
import { registerMetrics } from './metrics-sink.js';

// prom-client's index also loads its Pushgateway (node:http, https, zlib) and cluster aggregator; every
// vTPM domain loads this file, so take only the classes used here (docs/multi-vm.md, "A lean domain").
const lib = createRequire(import.meta.url);
const { Counter, Gauge, Histogram } = {
  Counter: lib('prom-client/lib/counter') as typeof Prom.Counter,
  Gauge: lib('prom-client/lib/gauge') as typeof Prom.Gauge,
  Histogram: lib('prom-client/lib/histogram') as typeof Prom.Histogram,
};
const Registry = lib('prom-client/lib/registry') as typeof Prom.Registry;
const collectDefaultMetrics = lib('prom-client/lib/defaultMetrics') as typeof Prom.collectDefaultMetrics;
type Counter<T extends string = string> = Prom.Counter<T>;
type Gauge<T extends string = string> = Prom.Gauge<T>;
type Histogram<T extends string = string> = Prom.Histogram<T>;
type Registry = Prom.Registry;

export const registry = new Registry();

export type DaemonName = 'backend' | 'manager' | 'xenstored' | 'hypervisor';
export type Transport = 'v2' | 'ring' | 'qemu';
/** success: TPM rc 0; tpm_error: the TPM answered with an error code; failure: no TPM answer (the backend made one up). */
export type CommandOutcome = 'success' | 'tpm_error' | 'failure';

let daemon: DaemonName | null = null;

/** How often the event-loop lag histogram samples (ms). */
export const LAG_SAMPLE_MS = 1000;

/** Label this process's metrics with its role and add Node's process metrics (memory, CPU, event-loop lag). */
export function initMetrics(role: DaemonName): void {
  if (daemon) return;
  daemon = role;
  registry.setDefaultLabels({ daemon: role });
  // Event-loop lag sampled once a second, not prom-client's default every 10 ms: that timer woke every
  // idle daemon 100 times a second, which a host of many guests pays for in CPU and wake-ups.
  collectDefaultMetrics({ register: registry, prefix: 'vtpm_', eventLoopMonitoringPrecision: LAG_SAMPLE_MS });
  // Gauges whose names end in _total break Prometheus' naming rules (promtool check metrics says so).
  for (const n of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(`vtpm_${n}`);
}

const LATENCY_BUCKETS = [5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 1, 10];

function counter<L extends string>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
  return new Counter<L>({ name, help, labelNames, registers: [registry] });
}

function histogram<L extends string>(name: string, help: string, labelNames: readonly L[], buckets = LATENCY_BUCKETS): Histogram<L> {
  return new Histogram<L>({ name, help, labelNames, buckets, registers: [registry] });
}

/** One label set of vtpm_command_duration_seconds: per-bucket counts, sum and count in plain numbers. */
export class DurationSeries {
  readonly labels: { transport: string; domid: string; vm: string };
  readonly counts = new Float64Array(LATENCY_BUCKETS.length);
  sum = 0;
  count = 0;

  constructor(labels: { transport: string; domid: string; vm: string }) {
    this.labels = labels;
  }

  observe(seconds: number): void {
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    if (i < LATENCY_BUCKETS.length) this.counts[i]!++;
    this.sum += seconds;
    this.count++;
  }
}

/**
 * vtpm_command_duration_seconds, observed once per guest command: a bucket search and three additions.
 * prom-client's Histogram hashes the label set and copies it on every observe(); this one is read
 * through the same registry in the same shape (cumulative _bucket series with le, _sum, _count).
 */
class CommandDurations {
  readonly name = 'vtpm_command_duration_seconds';
  readonly help = 'Time from a command reaching its vTPM to its answer, by transport and guest';
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  readonly #series = new Map<string, DurationSeries>();

  constructor() {
    registry.registerMetric(this as unknown as Prom.Metric);
  }

  /** The series of one guest (the same object for the same labels). */
  labels(transport: string, domid: string, vm: string): DurationSeries {
    const k = `${transport}\0${domid}\0${vm}`;
    let d = this.#series.get(k);
    if (!d) this.#series.set(k, (d = new DurationSeries({ transport, domid, vm })));
    return d;
  }

  get(): Promise<Prom.MetricObjectWithValues<Prom.MetricValueWithName<string>>> {
    const values: Array<Prom.MetricValueWithName<string>> = [];
    for (const d of this.#series.values()) {
      let acc = 0;
      LATENCY_BUCKETS.forEach((le, i) => {
        acc += d.counts[i]!;
        values.push({ labels: { ...d.labels, le }, value: acc, metricName: `${this.name}_bucket` });
      });
      values.push(
        { labels: { ...d.labels, le: '+Inf' }, value: d.count, metricName: `${this.name}_bucket` },
        { labels: { ...d.labels }, value: d.sum, metricName: `${this.name}_sum` },
        { labels: { ...d.labels }, value: d.count, metricName: `${this.name}_count` },
      );
    }
    return Promise.resolve({ name: this.name, help: this.help, type: this.type as unknown as Prom.MetricType, aggregator: this.aggregator, values, collect: () => {} });
  }

  reset(): void {
    this.#series.clear();
  }
}

/** One guest as the backend sees it, for vtpm_guests and vtpm_guest_info (read at each scrape). */
export interface GuestView {
  domid: string;
  vm: string;
  transport: Transport | 'none';
  /** xenbus state name of the backend's side (QEMU endpoints: Connected). */
  state: string;
}

const guestViews = new Map<object, GuestView>();

/** Publish (or update) what the backend knows of a guest; `forget` on its removal. */
export function showGuest(key: object, view: GuestView): void {
  guestViews.set(key, view);
}

export function forgetGuest(key: object): void {
  guestViews.delete(key);
}

/** Multi-VM mode: the vTPM-domain processes, read at each scrape (their own sockets would sit in a domain's reach). */
let domainSource: () => Array<{ domid: number; vm: string; pid: number }> = () => [];

export function showDomains(source: () => Array<{ domid: number; vm: string; pid: number }>): void {
  domainSource = source;
}

type DomainUsage = Array<{ labels: { domid: string; vm: string }; cpuSeconds: number; rssBytes: number }>;
let usageCache: { at: number; usage: DomainUsage } | null = null;

/** Each domain's /proc figures, read once per scrape (the memory gauge and the CPU counter both ask). */
function domainUsage(): DomainUsage {
  const now = Date.now();
  if (usageCache && now - usageCache.at < 100) return usageCache.usage;
  const out: DomainUsage = [];
  for (const d of domainSource()) {
    const u = procUsage(d.pid);
    if (u) out.push({ labels: { domid: String(d.domid), vm: d.vm }, ...u });
  }
  usageCache = { at: now, usage: out };
  return out;
}

function backendSet() {
  return {
    commands: new Counter({
      name: 'vtpm_commands_total',
      help: 'TPM commands answered, by guest, transport, command and outcome',
      labelNames: ['domid', 'vm', 'transport', 'command', 'rc'] as const,
      registers: [registry],
      collect(this: Counter<CommandLabel>) {
        for (const p of pendingCommands.values()) {
          if (p.n === 0) continue;
          this.inc(p.labels, p.n);
          p.n = 0;
        }
      },
    }),
    duration: new CommandDurations(),
    guests: new Gauge({
      name: 'vtpm_guests',
      help: 'Guests with a vTPM device or QEMU endpoint, by transport and xenbus state of the backend side',
      labelNames: ['transport', 'state'] as const,
      registers: [registry],
      collect(this: Gauge<'transport' | 'state'>) {
        this.reset();
        for (const g of guestViews.values()) this.inc({ transport: g.transport, state: g.state });
      },
    }),
    guestInfo: new Gauge({
      name: 'vtpm_guest_info',
      help: 'One series per guest (value 1): its domid, VM, transport and backend xenbus state',
      labelNames: ['domid', 'vm', 'transport', 'state'] as const,
      registers: [registry],
      collect(this: Gauge<'domid' | 'vm' | 'transport' | 'state'>) {
        this.reset();
        for (const g of guestViews.values()) this.set({ domid: g.domid, vm: g.vm, transport: g.transport, state: g.state }, 1);
      },
    }),
    suspends: counter('vtpm_suspends_total', 'Guest suspends acknowledged (in-flight commands answered, vTPM state durable)', ['transport'] as const),
    suspendDuration: histogram('vtpm_suspend_duration_seconds', 'From a guest asking to suspend to the backend acknowledging it', ['transport'] as const),
    resumes: counter('vtpm_resumes_total', 'Guests connected again after a suspend', ['transport'] as const),
    resumeDuration: histogram('vtpm_resume_duration_seconds', 'From a resumed frontend publishing its new ring to the backend going Connected', ['transport'] as const),
    cutOff: counter('vtpm_guests_cut_off_total', 'Frontends cut off (their device to Closing with an error), by reason', ['reason'] as const),
    refused: counter('vtpm_requests_refused_total', 'Ring requests answered EINVAL without running, by reason', ['reason'] as const),
    lastError: new Gauge({
      name: 'vtpm_guest_last_error_timestamp_seconds',
      help: 'When a guest last saw an error (Unix time), labelled with what it was; one series per guest',
      labelNames: ['domid', 'vm', 'error'] as const,
      registers: [registry],
      collect(this: Gauge<'domid' | 'vm' | 'error'>) {
        this.reset();
        for (const e of lastErrors.values()) this.set({ domid: e.domid, vm: e.vm, error: e.error }, e.at);
      },
    }),
    domainRestarts: counter('vtpm_domain_restarts_total', 'vTPM-domain processes that died and were restarted from the manager state (multi-VM mode)'),
    domainMemory: new Gauge({
      name: 'vtpm_domain_resident_memory_bytes',
      help: 'Resident memory of each vTPM-domain process (multi-VM mode)',
      labelNames: ['domid', 'vm'] as const,
      registers: [registry],
      collect(this: Gauge<'domid' | 'vm'>) {
        this.reset();
        for (const d of domainUsage()) this.set(d.labels, d.rssBytes);
      },
    }),
    domainCpu: new Counter({
      name: 'vtpm_domain_cpu_seconds_total',
      help: 'CPU time (user + system) of each vTPM domain\'s process; starts again from 0 when the domain is restarted (multi-VM mode)',
      labelNames: ['domid', 'vm'] as const,
      registers: [registry],
      collect(this: Counter<'domid' | 'vm'>) {
        this.reset();
        for (const d of domainUsage()) this.inc(d.labels, d.cpuSeconds);
      },
    }),
  };
}

function managerSet() {
  return {
    saves: counter('vtpm_manager_saves_total', 'vTPM state blobs saved durably at the manager'),
    commits: counter('vtpm_manager_commits_total', 'Group commits, by how they were made durable', ['kind'] as const),
    groupSize: histogram('vtpm_manager_group_commit_size', 'Operations per group commit', [], [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
    fsync: histogram('vtpm_manager_fsync_duration_seconds', 'One write-ahead-log append: pwrite plus fdatasync', []),
    checkpoints: counter('vtpm_manager_checkpoints_total', 'Checkpoints written (state as files, the log emptied)'),
    refused: counter('vtpm_manager_requests_refused_total', 'Client and console requests refused, by the status they were answered with', ['status'] as const),
  };
}

function xenstoreSet() {
  return {
    requests: counter('vtpm_xenstore_requests_total', 'xs_wire requests handled, by type', ['type'] as const),
    watchEvents: counter('vtpm_xenstore_watch_events_total', 'Watch events sent to connections'),
    cutOff: counter('vtpm_xenstore_connections_cut_off_total', 'Connections closed for protocol violations, by reason', ['reason'] as const),
  };
}

/** The hypervisor's domains, read at each scrape. */
let domainCount: () => number = () => 0;

export function showHypervisorDomains(count: () => number): void {
  domainCount = count;
}

function hypervisorSet() {
  return {
    hypercalls: counter('vtpm_hypervisor_hypercalls_total', 'Hypercalls handled, by operation', ['op'] as const),
    domains: new Gauge({
      name: 'vtpm_hypervisor_domains',
      help: 'Domains the hypervisor holds (dom0 processes, guests, vTPM domains)',
      registers: [registry],
      collect(this: Gauge) {
        this.set(domainCount());
      },
    }),
  };
}

type Lazy<T> = () => T;
function lazy<T>(make: () => T): Lazy<T> {
  let v: T | undefined;
  return () => (v ??= make());
}

/** The backend's metrics (created on first use). */
export const backendMetrics = lazy(backendSet);
/** The manager's metrics (created on first use). */
export const managerMetrics = lazy(managerSet);
/** The hypervisor's metrics (created on first use). */
export const hypervisorMetrics = lazy(hypervisorSet);
/** xenstored's metrics (created on first use). */
export const xenstoreMetrics = lazy(xenstoreSet);

export type BackendMetrics = ReturnType<typeof backendSet>;


// A guest's command counts and last error are plain numbers on its command path, folded into their
// series when the series are read (a scrape): prom-client hashes the label set of every inc() and
// set(), which cost each command microseconds for series read once in seconds.
type CommandLabel = 'domid' | 'vm' | 'transport' | 'command' | 'rc';

/** Commands counted since the last scrape, for one label set of vtpm_commands_total. */
export interface PendingCount {
  n: number;
}

const pendingCommands = new Map<string, { labels: Record<CommandLabel, string>; n: number }>();

/** The pending count of one vtpm_commands_total series (the same object for the same labels). */
export function commandCount(labels: Record<CommandLabel, string>): PendingCount {
  backendMetrics();
  const k = [labels.domid, labels.vm, labels.transport, labels.command, labels.rc].join('\0');
  let p = pendingCommands.get(k);
  if (!p) pendingCommands.set(k, (p = { labels: { ...labels }, n: 0 }));
  return p;
}

/** Each guest's last error and when it came (Unix seconds): one series per guest. */
const lastErrors = new Map<string, { domid: string; vm: string; error: string; at: number }>();

/** Record that guest `domid` just saw `error` (a name from a fixed set); its previous error series goes. */
export function guestError(domid: string, vm: string, error: string): void {
  backendMetrics();
  const k = `${domid}/${vm}`;
  const e = lastErrors.get(k);
  if (e) {
    e.error = error;
    e.at = Date.now() / 1000;
  } else lastErrors.set(k, { domid, vm, error, at: Date.now() / 1000 });
}

// Loading this module is what turns metrics on in a process (metrics-sink.ts).
registerMetrics({ backendMetrics, commandCount, guestError, showGuest, forgetGuest });
