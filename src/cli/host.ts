// `vtpm host up|down|status|restart`: the dom0 side of a host: the hypervisor, xenstored, the vTPM
// manager and the backend as separate processes, described in RUN/host.json. `host up` also recovers a run directory a
// crash left behind, and restarts the daemons of a host that died one by one.
import type { Command } from 'commander';
import fs from 'node:fs';
import { resolve } from 'node:path';
import { NoHostError, RunDir, alive, type HostInfo, type HostMode, type ProcessEntry } from './rundir.js';
import type { PlatformIdentity } from '../manager/ca-files.js';
import { stopProcess, tailFile } from './spawn.js';
import { DAEMON_ROLES, isDaemonRole, restartDaemon, startRole, type DaemonRole } from './restart.js';
import { CliError } from './errors.js';
import { EK_CODES } from '../manager/wire.js';
import { parseLogFormat, type LogFormat } from '../util/log.js';
import { checkListen, parseListen } from '../util/metrics-http.js';
import { addStoreOptions, parseStoreFlags, type StoreFlags } from './store-flags.js';
import { decideIsolation, describe, domainProcesses, parseUidBase, processUid, secureHost, type Isolation, type IsolationMode } from './isolation.js';
import { claimUidRange, releaseUidRange } from './uid-claims.js';

export interface HostUpOptions {
  /** auto (default): per-domain uids when root can have them, none otherwise (docs/isolation.md). */
  isolation?: 'auto' | IsolationMode;
  /**
   * dom<N> runs as uid uidBase + N. Given, the range must be free (another live host's overlapping
   * range is refused); left out, the first free range from VTPM_UID_BASE or 0x40000000 on is taken.
   */
  uidBase?: number;
  /** An operator's EK CA directory (cert.pem, key.pem), checked before anything starts. */
  ca?: string;
  /** EK certificates of a new TPM 2.0 whose attach does not choose: rsa, ecc, both (default) or none. */
  ekCerts?: string;
  /** What new TPMs' platform certificates name; left out, what a restarted host had, else the manager's defaults. */
  platform?: Partial<PlatformIdentity>;
  /** HOST:PORT where the backend serves the whole host's Prometheus metrics (docs/observability.md). */
  metrics?: string;
  /** Every daemon's log format (default text). */
  logFormat?: LogFormat;
  /** Progress lines (what was recovered or restarted). */
  report?: (line: string) => void;
  /** The manager's state in etcd (docs/cluster.md). */
  store?: StoreFlags;
}

function readHostIfAny(rd: RunDir): HostInfo | null {
  try {
    return rd.readHost();
  } catch (err) {
    if (err instanceof NoHostError) return null;
    throw err;
  }
}

/** Everything a host whose processes all died leaves in its run directory (its state dir is kept). */
function clearDeadHost(rd: RunDir, h: HostInfo): string[] {
  const removed: string[] = [];
  for (const p of [h.managerRunDir, h.xenstoredSocket, h.domainSocketDir, rd.vtpmDomainDir, h.xenDir, `${rd.dir}/metrics`]) {
    if (fs.existsSync(p)) removed.push(p);
    fs.rmSync(p, { recursive: true, force: true });
  }
  // Guests that were running died with the host; a suspended guest's record is its resume state.
  for (const g of rd.guests()) {
    if (!g.suspended && !alive(g.pid, g.start)) {
      rd.removeGuest(g.domid);
      removed.push(rd.guestFile(g.domid));
    }
  }
  return removed;
}

/**
 * Start a host in `runDir`. A run directory whose host died (every process gone) is cleared and
 * started afresh; one whose hypervisor and xenstored live but whose manager or backend died gets those
 * restarted.
 */
export async function hostUp(runDir: string, stateDir: string, mode: HostMode, opts: HostUpOptions = {}): Promise<HostInfo> {
  const report = opts.report ?? ((): void => {});
  const rd = new RunDir(runDir);
  const old = readHostIfAny(rd);
  if (old) {
    const dead = DAEMON_ROLES.filter((r) => !old.processes.some((p) => p.role === r && alive(p.pid)));
    if (resolve(stateDir) !== old.stateDir) {
      throw new CliError('CONFLICT', `the host in ${rd.dir} keeps its state in ${old.stateDir}, not ${resolve(stateDir)}; \`vtpm host down --run ${rd.dir}\` first to change it`);
    }
    if (dead.length === 0) throw new CliError('CONFLICT', `a host is already up in ${rd.dir}; run \`vtpm host down --run ${rd.dir}\` first`);
    // Domains live in the hypervisor and devices in xenstored: with both up, the rest can come back.
    if (!dead.includes('hypervisor') && !dead.includes('xenstored')) {
      // Restart only what died, in start order (the backend finds the manager, both find xenstored).
      for (const role of dead) {
        const pid = await restartDaemon(rd.dir, role);
        report(`restarted ${role} (pid ${pid}); it was dead`);
      }
      return rd.readHost();
    }
    // Without the hypervisor or xenstored every domain or device is gone: stop what is left, start afresh.
    const gone = dead.includes('hypervisor') ? 'the hypervisor' : 'xenstored';
    for (const p of old.processes.filter((q) => alive(q.pid)).reverse()) {
      await stopProcess(p.pid, 5000);
      report(`stopped ${p.role} (pid ${p.pid}): ${gone} died under it`);
    }
    for (const f of clearDeadHost(rd, old)) report(`removed ${f} (left by the dead host)`);
    fs.rmSync(rd.hostJson, { force: true });
  }
  // The metrics address is the backend's to bind: one taken is refused before anything starts.
  if (opts.metrics !== undefined) {
    try {
      await checkListen(opts.metrics);
    } catch (err) {
      throw new CliError('CONFLICT', (err as Error).message);
    }
  }
  const h = rd.plan(stateDir, mode);
  const ekCerts = opts.ekCerts ?? old?.ekCerts;
  if (ekCerts !== undefined) {
    if (!Object.keys(EK_CODES).includes(ekCerts)) throw new CliError('USAGE', `--ek-certs must be rsa, ecc, both or none, not ${ekCerts}`);
    h.ekCerts = ekCerts;
  }
  const platform = { ...old?.platform, ...opts.platform };
  if (Object.keys(platform).length > 0) h.platform = platform;
  // A host recovered from a crash keeps signing with the CA it was started with.
  const ca = opts.ca ?? old?.ca;
  if (ca !== undefined) {
    h.ca = resolve(ca);
    // Refused here, naming the file, rather than as a manager that died during start-up.
    // Loaded here only: the X.509 library costs every other `vtpm` command start-up time and memory.
    const { CaError, EkCa } = await import('../manager/ca.js');
    await EkCa.open({ stateDir: h.stateDir, operatorDir: h.ca }).catch((err: unknown) => {
      throw err instanceof CaError ? new CliError('USAGE', `--ca: ${err.message}`) : err;
    });
  }
  if (opts.metrics !== undefined) h.metrics = opts.metrics;
  if (opts.logFormat !== undefined) h.logFormat = opts.logFormat;
  if (opts.store) h.store = opts.store;
  // No host.json: whatever a host without one left here is stale too.
  if (!old && fs.existsSync(rd.dir)) for (const f of clearDeadHost(rd, h)) report(`removed ${f} (left by a dead host)`);
  // Parents as the umask makes them; the run dir's own mode is set by secureHost once the isolation is known.
  fs.mkdirSync(rd.dir, { recursive: true });
  h.isolation = decideIsolation(opts.isolation ?? 'auto', rd.dir, opts.uidBase ?? parseUidBase(process.env.VTPM_UID_BASE));
  if (h.isolation.mode === 'uid') h.isolation.uidBase = claimUidRange(rd.dir, h.isolation.uidBase, opts.uidBase !== undefined);
  for (const d of [h.stateDir, h.domainSocketDir, h.managerRunDir, rd.logDir, rd.guestDir]) fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  fs.rmSync(h.xenDir, { recursive: true, force: true });
  fs.mkdirSync(h.xenDir, { recursive: true, mode: 0o700 });
  secureHost(h, 'dirs');
  try {
    for (const role of DAEMON_ROLES) await startRole(rd, h, role);
    return h;
  } catch (err) {
    for (const p of [...h.processes].reverse()) await stopProcess(p.pid, 5000);
    fs.rmSync(rd.hostJson, { force: true });
    if (h.isolation.mode === 'uid') releaseUidRange(rd.dir, h.isolation.uidBase);
    throw err;
  }
}

export async function hostDown(runDir: string): Promise<void> {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  // Guests first (they close their devices), then the backend (it answers in-flight commands and saves
  // its vTPMs), then the manager, xenstored and the hypervisor.
  await Promise.all(
    rd.guests().map(async (g) => {
      // A guest rewrites its own record: its pid there is not what identifies its processes.
      await Promise.all(domainProcesses(h.isolation, g.domid, g.pid).map((pid) => stopProcess(pid, 10_000)));
      rd.removeGuest(g.domid);
    }),
  );
  for (const role of [...DAEMON_ROLES].reverse()) {
    for (const p of h.processes.filter((q) => q.role === role)) {
      const clean = await stopProcess(p.pid);
      if (!clean) process.stderr.write(`vtpm host down: ${role} (pid ${p.pid}) did not stop in time and was killed\n`);
    }
  }
  // What a crashed daemon left (FIFOs, sockets, domain memory) goes too: the next `host up` starts clean.
  clearDeadHost(rd, h);
  fs.rmSync(rd.hostJson, { force: true });
  if (h.isolation?.mode === 'uid') releaseUidRange(rd.dir, h.isolation.uidBase);
}

export type ProcessState = 'running' | 'suspended' | 'dead';

export interface StatusEntry extends ProcessEntry {
  alive: boolean;
  state: ProcessState;
  /** Guests and vTPM domains: the VM whose vTPM it is. */
  vm?: string;
  /** vTPM domains: the guest domain whose VM it serves. */
  serves?: number;
  /** The uid the process runs under (null when it is gone). */
  uid: number | null;
}

export interface HostStatus {
  mode: string;
  runDir: string;
  isolation: Isolation;
  processes: StatusEntry[];
  /** Daemons the host needs that are dead (`host status` then exits 3). */
  dead: DaemonRole[];
}

export function hostStatus(runDir: string): HostStatus {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  const state = (live: boolean, suspended = false): ProcessState => (live ? 'running' : suspended ? 'suspended' : 'dead');
  const uid = (live: boolean, pid: number): number | null => (live ? processUid(pid) : null);
  const procs: StatusEntry[] = h.processes.map((p) => ({ ...p, alive: alive(p.pid), state: state(alive(p.pid)), uid: uid(alive(p.pid), p.pid) }));
  const guests = rd.guests();
  for (const g of guests) {
    const live = alive(g.pid, g.start);
    procs.push({ role: 'guest', domid: g.domid, pid: g.pid, vm: g.vm, protocol: g.protocol, alive: live, state: state(live, g.suspended === true), uid: uid(live, g.pid) });
  }
  let files: string[] = [];
  try {
    files = fs.readdirSync(rd.vtpmDomainDir).filter((f) => f.endsWith('.json'));
  } catch {
    // single-VM mode: no vTPM domains
  }
  for (const f of files) {
    let d: ProcessEntry;
    try {
      d = JSON.parse(fs.readFileSync(`${rd.vtpmDomainDir}/${f}`, 'utf8')) as ProcessEntry;
    } catch {
      continue; // removed while we listed it
    }
    const vm = typeof d.vm === 'string' ? d.vm : undefined;
    const guest = vm === undefined ? undefined : guests.find((g) => g.vm === vm);
    const live = alive(d.pid);
    procs.push({ ...d, role: 'vtpm-domain', alive: live, state: state(live), uid: uid(live, d.pid), ...(vm ? { vm } : {}), ...(guest ? { serves: guest.domid } : {}) });
  }
  const dead = DAEMON_ROLES.filter((r) => !procs.some((p) => p.role === r && p.alive));
  const isolation = h.isolation ?? { mode: 'none', uidBase: 0, reason: 'host.json predates isolation' };
  return { mode: h.mode, runDir: rd.dir, isolation, processes: procs, dead };
}

/** One line per process: role, domain, pid, state, then what it serves (more columns go at the end). */
export function formatStatus(s: HostStatus): string[] {
  const lines = [`mode: ${s.mode}`, `isolation: ${describe(s.isolation)}`];
  for (const p of s.processes) {
    const what: string[] = [];
    if (p.role === 'guest') what.push(`VM ${p.vm}`, String(p.protocol));
    if (p.role === 'vtpm-domain') {
      if (p.instance !== undefined) what.push(`vTPM ${String(p.instance)}`);
      if (p.vm) what.push(`VM ${p.vm}`);
      what.push(p.serves !== undefined ? `serves dom${p.serves}` : 'serves no attached guest');
    }
    // Under isolation each domain's uid is the point; without it every process has the same one.
    if (p.uid !== null && s.isolation.mode === 'uid') what.push(`uid ${p.uid}`);
    lines.push(`${p.role.padEnd(12)} dom${String(p.domid).padEnd(6)} pid ${String(p.pid).padEnd(8)} ${p.state.padEnd(10)}${what.join('  ')}`.trimEnd());
  }
  for (const r of s.dead) lines.push(`${r} is dead: \`vtpm host up --run ${s.runDir} --state DIR\` restarts it (or \`vtpm host restart ${r}\`)`);
  return lines;
}

const parseMode = (m: string): HostMode => {
  if (m !== 'single' && m !== 'multi' && m !== 'stubdom') throw new CliError('USAGE', `--mode must be single, multi or stubdom, not ${m}`);
  return m;
};

export function register(program: Command): void {
  const host = program.command('host').description('start, stop, restart and inspect the dom0 processes of a host');
  const up = host
    .command('up')
    .description('start the hypervisor, xenstored, the manager and the backend as separate processes; returns when all are ready. Recovers a run directory a crash left behind and restarts daemons that died')
    .requiredOption('--run <dir>', 'run directory (sockets, FIFOs, logs, host.json)')
    .requiredOption('--state <dir>', 'state directory of the manager (sealed vTPM state, VM table, keys)')
    .option('--mode <mode>', 'single (vTPMs in the backend), multi (one vTPM-domain process each behind dom0\'s backend) or stubdom (each vTPM domain is its guest\'s backend, Xen 4.x)', 'single')
    .option('--isolation <how>', 'uid (each guest and vTPM domain under its own uid; root only), none, or auto: uid when possible', 'auto')
    .option('--uid-base <n>', 'dom<N> runs as uid/gid BASE+N; refused if another live host holds an overlapping range (default: the first free range from VTPM_UID_BASE or 1073741824 on)')
    .option('--metrics <host:port>', 'serve the whole host\'s Prometheus metrics on http://HOST:PORT/metrics (docs/observability.md)')
    .option('--log-format <fmt>', 'every daemon logs text (default) or json (one object per event)', 'text')
    .option('--ca <dir>', "sign EK certificates with an operator's CA: DIR/cert.pem (issuing certificate, then its chain) and DIR/key.pem; default: a host CA made in STATE/ca")
    .option('--ek-certs <which>', 'EK certificates of a new TPM whose attach does not choose: rsa, ecc, both or none (default both; a TPM 1.2 is certified under rsa and both)')
    .option('--platform-manufacturer <s>', 'the platform certificate of a new TPM 2.0 names this manufacturer (default vtpm-split)')
    .option('--platform-model <s>', 'and this platform model (default vtpm-split)')
    .option('--platform-version <s>', 'and this platform version (default 1)');
  addStoreOptions(up).action(
    async (o: { run: string; state: string; mode: string; isolation: string; uidBase?: string; store?: string; masterKey?: string; leaseTtl?: string; metrics?: string; logFormat: string; ca?: string; ekCerts?: string; platformManufacturer?: string; platformModel?: string; platformVersion?: string }) => {
      if (o.isolation !== 'auto' && o.isolation !== 'uid' && o.isolation !== 'none') throw new CliError('USAGE', `--isolation must be auto, uid or none, not ${o.isolation}`);
      let logFormat: LogFormat;
      try {
        if (o.metrics !== undefined) parseListen(o.metrics);
        logFormat = parseLogFormat(o.logFormat);
      } catch (err) {
        throw new CliError('USAGE', (err as Error).message);
      }
      const h = await hostUp(o.run, o.state, parseMode(o.mode), {
        ...(o.metrics !== undefined ? { metrics: o.metrics } : {}),
        logFormat,
        isolation: o.isolation,
        ...(o.uidBase !== undefined ? { uidBase: parseUidBase(o.uidBase) } : {}),
        ca: o.ca,
        ekCerts: o.ekCerts,
        platform: {
          ...(o.platformManufacturer !== undefined ? { manufacturer: o.platformManufacturer } : {}),
          ...(o.platformModel !== undefined ? { model: o.platformModel } : {}),
          ...(o.platformVersion !== undefined ? { version: o.platformVersion } : {}),
        },
        report: (l) => console.log(l),
        store: parseStoreFlags(o),
      });
      for (const p of h.processes) console.log(`${p.role.padEnd(10)} dom${p.domid} pid ${p.pid}`);
      console.log(`isolation: ${describe(h.isolation)}`);
      if (h.metrics) console.log(`metrics: http://${h.metrics}/metrics`);
      console.log(`host up in ${h.runDir} (${h.mode === 'stubdom' ? 'stub-domain' : `${h.mode}-VM`} mode${h.store ? `, state in ${h.store.url}` : ''})`);
    },
  );
  host
    .command('down')
    .description('stop guests, backend, manager, xenstored and the hypervisor cleanly (vTPM state saved)')
    .requiredOption('--run <dir>', 'run directory of the host')
    .action(async (o: { run: string }) => {
      await hostDown(o.run);
      console.log('host down');
    });
  host
    .command('restart')
    .description(`start a dead daemon of the host again (${DAEMON_ROLES.join(', ')}); a live one is left alone`)
    .argument('<role>', DAEMON_ROLES.join(' | '))
    .requiredOption('--run <dir>', 'run directory of the host')
    .action(async (role: string, o: { run: string }) => {
      if (!isDaemonRole(role)) throw new CliError('USAGE', `ROLE must be one of ${DAEMON_ROLES.join(', ')}, not ${role}`);
      const pid = await restartDaemon(o.run, role);
      console.log(`${role} restarted (pid ${pid})`);
    });
  host
    .command('status')
    .description('every process of the host: role, domain, pid, state (running, suspended, dead), the VM it serves; exit 3 if a daemon the host needs is dead')
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--json', 'print {"mode", "isolation": {"mode", "uidBase", "reason"}, "processes": [{"role", "domid", "pid", "state", "alive", "uid", "vm", "serves", …}], "dead": [roles]}')
    .action((o: { run: string; json?: boolean }) => {
      const s = hostStatus(o.run);
      console.log(o.json ? JSON.stringify(s, null, 2) : formatStatus(s).join('\n'));
      if (s.dead.length > 0) process.exitCode = 3;
    });
}

export { tailFile };
