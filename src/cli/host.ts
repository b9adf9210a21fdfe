// `vtpm host up|down|status|restart`: the dom0 side of a host: xenstored, the vTPM manager and the
// backend as separate processes, described in RUN/host.json. `host up` also recovers a run directory a
// crash left behind, and restarts the daemons of a host that died one by one.
import type { Command } from 'commander';
import fs from 'node:fs';
import { resolve } from 'node:path';
import { NoHostError, RunDir, alive, type HostInfo, type ProcessEntry } from './rundir.js';
import { stopProcess, tailFile } from './spawn.js';
import { DAEMON_ROLES, isDaemonRole, restartDaemon, startRole, type DaemonRole } from './restart.js';
import { CliError } from './errors.js';

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
  for (const p of [h.managerRunDir, h.xenstoredSocket, h.domainSocketDir, rd.vtpmDomainDir, h.xenDir]) {
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
 * started afresh; one whose xenstored lives but whose manager or backend died gets those restarted.
 */
export async function hostUp(runDir: string, stateDir: string, mode: 'single' | 'multi', report: (line: string) => void = () => {}): Promise<HostInfo> {
  const rd = new RunDir(runDir);
  const old = readHostIfAny(rd);
  if (old) {
    const dead = DAEMON_ROLES.filter((r) => !old.processes.some((p) => p.role === r && alive(p.pid)));
    if (resolve(stateDir) !== old.stateDir) {
      throw new CliError('CONFLICT', `the host in ${rd.dir} keeps its state in ${old.stateDir}, not ${resolve(stateDir)}; \`vtpm host down --run ${rd.dir}\` first to change it`);
    }
    if (dead.length === 0) throw new CliError('CONFLICT', `a host is already up in ${rd.dir}; run \`vtpm host down --run ${rd.dir}\` first`);
    const xsAlive = !dead.includes('xenstored');
    if (xsAlive) {
      // Restart only what died, in start order (the backend finds the manager, both find xenstored).
      for (const role of dead) {
        const pid = await restartDaemon(rd.dir, role);
        report(`restarted ${role} (pid ${pid}); it was dead`);
      }
      return rd.readHost();
    }
    // Without xenstored every device is gone: stop what is left and start afresh.
    for (const p of old.processes.filter((q) => alive(q.pid)).reverse()) {
      await stopProcess(p.pid, 5000);
      report(`stopped ${p.role} (pid ${p.pid}): xenstored died under it`);
    }
    for (const f of clearDeadHost(rd, old)) report(`removed ${f} (left by the dead host)`);
    fs.rmSync(rd.hostJson, { force: true });
  }
  const h = rd.plan(stateDir, mode);
  // No host.json: whatever a host without one left here is stale too.
  if (!old && fs.existsSync(rd.dir)) for (const f of clearDeadHost(rd, h)) report(`removed ${f} (left by a dead host)`);
  fs.mkdirSync(rd.dir, { recursive: true });
  fs.mkdirSync(h.stateDir, { recursive: true });
  fs.mkdirSync(h.domainSocketDir, { recursive: true });
  fs.mkdirSync(h.managerRunDir, { recursive: true });
  fs.rmSync(h.xenDir, { recursive: true, force: true });
  fs.mkdirSync(h.xenDir, { recursive: true, mode: 0o700 });
  try {
    for (const role of DAEMON_ROLES) await startRole(rd, h, role);
    return h;
  } catch (err) {
    for (const p of [...h.processes].reverse()) await stopProcess(p.pid, 5000);
    fs.rmSync(rd.hostJson, { force: true });
    throw err;
  }
}

export async function hostDown(runDir: string): Promise<void> {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  // Guests first (they close their devices), then the backend (it answers in-flight commands and saves
  // its vTPMs), then the manager, then xenstored.
  await Promise.all(
    rd.guests().map(async (g) => {
      await stopProcess(g.pid, 10_000);
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
}

export type ProcessState = 'running' | 'suspended' | 'dead';

export interface StatusEntry extends ProcessEntry {
  alive: boolean;
  state: ProcessState;
  /** Guests and vTPM domains: the VM whose vTPM it is. */
  vm?: string;
  /** vTPM domains: the guest domain whose VM it serves. */
  serves?: number;
}

export interface HostStatus {
  mode: string;
  runDir: string;
  processes: StatusEntry[];
  /** Daemons the host needs that are dead (`host status` then exits 3). */
  dead: DaemonRole[];
}

export function hostStatus(runDir: string): HostStatus {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  const state = (live: boolean, suspended = false): ProcessState => (live ? 'running' : suspended ? 'suspended' : 'dead');
  const procs: StatusEntry[] = h.processes.map((p) => ({ ...p, alive: alive(p.pid), state: state(alive(p.pid)) }));
  const guests = rd.guests();
  for (const g of guests) {
    const live = alive(g.pid, g.start);
    procs.push({ role: 'guest', domid: g.domid, pid: g.pid, vm: g.vm, protocol: g.protocol, alive: live, state: state(live, g.suspended === true) });
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
    procs.push({ ...d, role: 'vtpm-domain', alive: alive(d.pid), state: state(alive(d.pid)), ...(vm ? { vm } : {}), ...(guest ? { serves: guest.domid } : {}) });
  }
  const dead = DAEMON_ROLES.filter((r) => !procs.some((p) => p.role === r && p.alive));
  return { mode: h.mode, runDir: rd.dir, processes: procs, dead };
}

/** One line per process: role, domain, pid, state, then what it serves (more columns go at the end). */
export function formatStatus(s: HostStatus): string[] {
  const lines = [`mode: ${s.mode}`];
  for (const p of s.processes) {
    const what: string[] = [];
    if (p.role === 'guest') what.push(`VM ${p.vm}`, String(p.protocol));
    if (p.role === 'vtpm-domain') {
      if (p.instance !== undefined) what.push(`vTPM ${String(p.instance)}`);
      if (p.vm) what.push(`VM ${p.vm}`);
      what.push(p.serves !== undefined ? `serves dom${p.serves}` : 'serves no attached guest');
    }
    lines.push(`${p.role.padEnd(12)} dom${String(p.domid).padEnd(6)} pid ${String(p.pid).padEnd(8)} ${p.state.padEnd(10)}${what.join('  ')}`.trimEnd());
  }
  for (const r of s.dead) lines.push(`${r} is dead: \`vtpm host up --run ${s.runDir} --state DIR\` restarts it (or \`vtpm host restart ${r}\`)`);
  return lines;
}

const parseMode = (m: string): 'single' | 'multi' => {
  if (m !== 'single' && m !== 'multi') throw new CliError('USAGE', `--mode must be single or multi, not ${m}`);
  return m;
};

export function register(program: Command): void {
  const host = program.command('host').description('start, stop, restart and inspect the dom0 processes of a host');
  host
    .command('up')
    .description('start xenstored, the manager and the backend as separate processes; returns when all are ready. Recovers a run directory a crash left behind and restarts daemons that died')
    .requiredOption('--run <dir>', 'run directory (sockets, FIFOs, logs, host.json)')
    .requiredOption('--state <dir>', 'state directory of the manager (sealed vTPM state, VM table, keys)')
    .option('--mode <mode>', 'single (vTPMs in the backend) or multi (one vTPM-domain process each)', 'single')
    .action(async (o: { run: string; state: string; mode: string }) => {
      const h = await hostUp(o.run, o.state, parseMode(o.mode), (l) => console.log(l));
      for (const p of h.processes) console.log(`${p.role.padEnd(10)} dom${p.domid} pid ${p.pid}`);
      console.log(`host up in ${h.runDir} (${h.mode}-VM mode)`);
    });
  host
    .command('down')
    .description('stop guests, backend, manager and xenstored cleanly (vTPM state saved)')
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
    .option('--json', 'print {"mode", "processes": [{"role", "domid", "pid", "state", "alive", "vm", "serves", …}], "dead": [roles]}')
    .action((o: { run: string; json?: boolean }) => {
      const s = hostStatus(o.run);
      console.log(o.json ? JSON.stringify(s, null, 2) : formatStatus(s).join('\n'));
      if (s.dead.length > 0) process.exitCode = 3;
    });
}

export { tailFile };
