// `vtpm host up|down|status`: the dom0 side of a host: xenstored, the vTPM manager and the backend as
// separate processes, described in RUN/host.json.
import type { Command } from 'commander';
import fs from 'node:fs';
import { RunDir, alive, type HostInfo, type ProcessEntry } from './rundir.js';
import { startDaemon, stopProcess, tailFile } from './spawn.js';
import { decideIsolation, describe, domainProcesses, parseUidBase, processUid, secureHost, type Isolation, type IsolationMode } from './isolation.js';
import { engineEnv } from '../tpm/threadpool.js';
import { hypervisorSocket } from '../xen/hypercall.js';

export interface HostUpOptions {
  /** auto (default): per-domain uids when root can have them, none otherwise (docs/isolation.md). */
  isolation?: 'auto' | IsolationMode;
  /** dom<N> runs as uid uidBase + N; default VTPM_UID_BASE or 0x40000000. */
  uidBase?: number;
}

export async function hostUp(runDir: string, stateDir: string, mode: 'single' | 'multi', opts: HostUpOptions = {}): Promise<HostInfo> {
  const rd = new RunDir(runDir);
  // Parents as the umask makes them; the run dir's own mode is set below once the isolation is known.
  fs.mkdirSync(rd.dir, { recursive: true });
  try {
    const old = rd.readHost();
    if (old.processes.some((p) => alive(p.pid))) throw new Error(`a host is already up in ${rd.dir}; run \`vtpm host down --run ${rd.dir}\` first`);
  } catch (err) {
    if (!(err instanceof Error && err.message.startsWith('no host is up'))) throw err;
  }
  const h = rd.plan(stateDir, mode);
  const iso = decideIsolation(opts.isolation ?? 'auto', rd.dir, opts.uidBase ?? parseUidBase(process.env.VTPM_UID_BASE));
  h.isolation = iso;
  for (const d of [h.stateDir, h.domainSocketDir, h.managerRunDir, rd.logDir, rd.guestDir]) fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  fs.rmSync(h.xenDir, { recursive: true, force: true });
  fs.mkdirSync(h.xenDir, { recursive: true, mode: 0o700 });
  secureHost(h, 'dirs');
  const env = { VTPM_XEN_DIR: h.xenDir };
  const started: ProcessEntry[] = [];
  try {
    // First: every other process's domain is created by, and lives in, the hypervisor.
    const hv = await startDaemon(['hypervisor', '--dir', h.xenDir, '--verbose'], rd.log('hypervisor'), /vtpm-hypervisor: ready/, env);
    started.push({ role: 'hypervisor', domid: 0, pid: hv.pid, socket: hypervisorSocket(h.xenDir) });
    const xs = await startDaemon(
      ['xenstored', '--socket', h.xenstoredSocket, '--domain-socket-dir', h.domainSocketDir, '--verbose', ...uidBaseArg(iso)],
      rd.log('xenstored'),
      /xenstored listening/,
      env,
    );
    started.push({ role: 'xenstored', domid: 0, pid: xs.pid, socket: h.xenstoredSocket });
    // libuv reads its pool size at start: the manager fsyncs a whole group commit in parallel there.
    const mgr = await startDaemon(['manager', '--state', h.stateDir, '--run', h.managerRunDir], rd.log('manager'), /vtpm-manager: ready/, {
      ...env,
      UV_THREADPOOL_SIZE: '64',
    });
    started.push({ role: 'manager', domid: 0, pid: mgr.pid, run: h.managerRunDir });
    h.processes = started;
    // The backend reads host.json to find the others.
    rd.writeHost(h);
    const be = await startDaemon(['backend', '--run', rd.dir], rd.log('backend'), /vtpm-backend: ready/, engineEnv({ ...process.env, ...env }));
    started.push({ role: 'backend', domid: 0, pid: be.pid, mode });
    secureHost(h, 'backend');
    h.processes = started;
    rd.writeHost(h);
    return h;
  } catch (err) {
    for (const p of started.reverse()) await stopProcess(p.pid, 5000);
    fs.rmSync(rd.hostJson, { force: true });
    throw err;
  }
}

function uidBaseArg(iso: Isolation): string[] {
  return iso.mode === 'uid' ? ['--domain-uid-base', String(iso.uidBase)] : [];
}

export async function hostDown(runDir: string): Promise<void> {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  // Guests first (they close their devices), then the backend (it answers in-flight commands and saves
  // its vTPMs), then the manager, then xenstored.
  await Promise.all(
    rd.guests().map(async (g) => {
      // A guest rewrites its own record: its pid there is not what identifies its processes.
      await Promise.all(domainProcesses(h.isolation, g.domid, g.pid).map((pid) => stopProcess(pid, 10_000)));
      rd.removeGuest(g.domid);
    }),
  );
  const order: ProcessEntry['role'][] = ['backend', 'manager', 'xenstored', 'hypervisor'];
  for (const role of order) {
    for (const p of h.processes.filter((q) => q.role === role)) {
      const clean = await stopProcess(p.pid);
      if (!clean) process.stderr.write(`vtpm host down: ${role} (pid ${p.pid}) did not stop in time and was killed\n`);
    }
  }
  fs.rmSync(h.xenDir, { recursive: true, force: true });
  fs.rmSync(rd.hostJson, { force: true });
}

export interface StatusEntry extends ProcessEntry {
  alive: boolean;
  /** The uid the process runs under (null when it is gone). */
  uid: number | null;
}

export interface HostStatus {
  mode: string;
  isolation: Isolation;
  processes: StatusEntry[];
}

export function hostStatus(runDir: string): HostStatus {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  const live = (pid: number, start?: number): { alive: boolean; uid: number | null } => {
    const a = alive(pid, start);
    return { alive: a, uid: a ? processUid(pid) : null };
  };
  const procs: StatusEntry[] = h.processes.map((p) => ({ ...p, ...live(p.pid) }));
  for (const g of rd.guests()) procs.push({ role: 'guest', domid: g.domid, pid: g.pid, vm: g.vm, protocol: g.protocol, ...live(g.pid, g.start) });
  try {
    for (const f of fs.readdirSync(rd.vtpmDomainDir)) {
      if (!f.endsWith('.json')) continue;
      const d = JSON.parse(fs.readFileSync(`${rd.vtpmDomainDir}/${f}`, 'utf8')) as ProcessEntry;
      procs.push({ ...d, role: 'vtpm-domain', ...live(d.pid) });
    }
  } catch {
    // single-VM mode: no vTPM domains
  }
  const isolation = h.isolation ?? { mode: 'none', uidBase: 0, reason: 'host.json predates isolation' };
  return { mode: h.mode, isolation, processes: procs };
}

export function register(program: Command): void {
  const host = program.command('host').description('start, stop and inspect the dom0 processes of a host');
  host
    .command('up')
    .description('start the hypervisor, xenstored, the manager and the backend as separate processes; returns when all are ready')
    .requiredOption('--run <dir>', 'run directory (sockets, FIFOs, logs, host.json)')
    .requiredOption('--state <dir>', 'state directory of the manager (sealed vTPM state, VM table, keys)')
    .option('--mode <mode>', 'single (vTPMs in the backend) or multi (one vTPM-domain process each)', 'single')
    .option('--isolation <how>', 'uid (each guest and vTPM domain under its own uid; root only), none, or auto: uid when possible', 'auto')
    .option('--uid-base <n>', 'dom<N> runs as uid/gid BASE+N (default VTPM_UID_BASE or 1073741824)')
    .action(async (o: { run: string; state: string; mode: string; isolation: string; uidBase?: string }) => {
      if (o.mode !== 'single' && o.mode !== 'multi') throw new Error(`--mode must be single or multi, not ${o.mode}`);
      if (o.isolation !== 'auto' && o.isolation !== 'uid' && o.isolation !== 'none') throw new Error(`--isolation must be auto, uid or none, not ${o.isolation}`);
      const h = await hostUp(o.run, o.state, o.mode, { isolation: o.isolation, uidBase: parseUidBase(o.uidBase ?? process.env.VTPM_UID_BASE) });
      for (const p of h.processes) console.log(`${p.role.padEnd(10)} dom${p.domid} pid ${p.pid}`);
      console.log(`isolation: ${describe(h.isolation)}`);
      console.log(`host up in ${h.runDir} (${h.mode}-VM mode)`);
    });
  host
    .command('down')
    .description('stop guests, backend, manager, xenstored and the hypervisor cleanly (vTPM state saved)')
    .requiredOption('--run <dir>', 'run directory of the host')
    .action(async (o: { run: string }) => {
      await hostDown(o.run);
      console.log('host down');
    });
  host
    .command('status')
    .description('list every process of the host with its role, domid and pid')
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--json', 'print {"mode", "isolation": {"mode", "uidBase", "reason"}, "processes": [{"role", "domid", "pid", "uid", …}]}')
    .action((o: { run: string; json?: boolean }) => {
      const s = hostStatus(o.run);
      if (o.json) {
        console.log(JSON.stringify(s, null, 2));
        return;
      }
      console.log(`mode: ${s.mode}`);
      console.log(`isolation: ${describe(s.isolation)}`);
      for (const p of s.processes) {
        const uid = p.uid === null ? '' : `uid ${p.uid}`;
        console.log(`${p.role.padEnd(12)} dom${String(p.domid).padEnd(4)} pid ${String(p.pid).padEnd(8)} ${(p.alive ? 'running' : 'DEAD').padEnd(8)} ${uid}`.trimEnd());
      }
    });
}

export { tailFile };
