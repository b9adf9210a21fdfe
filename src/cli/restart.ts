// Starting one of a host's daemons, fresh or after it died (killed -9, crashed): the same command line
// and environment every time, whatever a dead predecessor left in the run directory removed first,
// and host.json updated so `host down` and `host status` see the new process.
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RunDir, alive, type HostInfo, type ProcessEntry } from './rundir.js';
import { startDaemon } from './spawn.js';
import { secureHost } from './isolation.js';
import { engineEnv } from '../tpm/threadpool.js';
import { CliError } from './errors.js';
import { hypervisorSocket } from '../xen/hypercall.js';
import { metricsSocket } from '../util/metrics-http.js';
import { storeArgs } from './store-flags.js';

/** The daemons a host needs, in start order (stopped in reverse). */
export const DAEMON_ROLES = ['hypervisor', 'xenstored', 'manager', 'backend'] as const;
export type DaemonRole = (typeof DAEMON_ROLES)[number];

export function isDaemonRole(r: string): r is DaemonRole {
  return (DAEMON_ROLES as readonly string[]).includes(r);
}

/** What a dead `role` leaves behind that its successor would trip on. */
function clearRemains(h: HostInfo, role: DaemonRole): void {
  if (role === 'hypervisor') {
    // Every domain's memory died with it: only its socket and directory are left.
    fs.rmSync(h.xenDir, { recursive: true, force: true });
    fs.mkdirSync(h.xenDir, { recursive: true, mode: 0o700 });
  } else if (role === 'xenstored') {
    fs.rmSync(h.xenstoredSocket, { force: true });
    fs.rmSync(h.domainSocketDir, { recursive: true, force: true });
    fs.mkdirSync(h.domainSocketDir, { recursive: true, mode: h.isolation?.mode === 'uid' ? 0o711 : 0o700 });
  } else if (role === 'backend') {
    // The backend's FIFO pair at the manager: its successor creates the same names. A live manager
    // removes a dead client's pair itself (and would remove the successor's by name if we raced it).
    const mgr = h.processes.find((p) => p.role === 'manager');
    if (!mgr || !alive(mgr.pid)) for (const f of ['backend.req.fifo', 'backend.rsp.fifo']) fs.rmSync(join(h.managerRunDir, 'clients', f), { force: true });
  }
  // The manager removes a dead predecessor's pid file and reuses its FIFOs itself.
}

/** Start `role` of the host in `rd` and record it in host.json (replacing a dead entry). */
export async function startRole(rd: RunDir, h: HostInfo, role: DaemonRole): Promise<ProcessEntry> {
  clearRemains(h, role);
  // Every daemon serves its metrics on a socket here and logs in the host's format (docs/observability.md).
  fs.mkdirSync(join(rd.dir, 'metrics'), { recursive: true, mode: 0o700 });
  const env = { VTPM_XEN_DIR: h.xenDir, VTPM_METRICS_SOCKET: metricsSocket(rd.dir, role) };
  const logArgs = ['--log-format', h.logFormat ?? 'text'];
  let entry: ProcessEntry;
  if (role === 'hypervisor') {
    // First: every other process's domain is created by, and lives in, the hypervisor.
    const s = await startDaemon(['hypervisor', '--dir', h.xenDir, '--verbose', ...logArgs], rd.log('hypervisor'), /vtpm-hypervisor: ready/, env);
    entry = { role, domid: 0, pid: s.pid, socket: hypervisorSocket(h.xenDir) };
  } else if (role === 'xenstored') {
    const uidBase = h.isolation?.mode === 'uid' ? ['--domain-uid-base', String(h.isolation.uidBase)] : [];
    const s = await startDaemon(
      ['xenstored', '--socket', h.xenstoredSocket, '--domain-socket-dir', h.domainSocketDir, '--verbose', ...uidBase, ...logArgs],
      rd.log('xenstored'),
      /xenstored listening/,
      env,
    );
    entry = { role, domid: 0, pid: s.pid, socket: h.xenstoredSocket };
  } else if (role === 'manager') {
    // libuv reads its pool size at start: the manager fsyncs a whole group commit in parallel there.
    const p = h.platform ?? {};
    const platform = [...(p.manufacturer !== undefined ? ['--platform-manufacturer', p.manufacturer] : []), ...(p.model !== undefined ? ['--platform-model', p.model] : []), ...(p.version !== undefined ? ['--platform-version', p.version] : [])];
    const ek = [...(h.ca ? ['--ca', h.ca] : []), ...(h.ekCerts ? ['--ek-certs', h.ekCerts] : []), ...platform];
    const s = await startDaemon(['manager', '--state', h.stateDir, '--run', h.managerRunDir, ...storeArgs(h.store), ...logArgs, ...ek], rd.log('manager'), /vtpm-manager: ready/, { ...env, UV_THREADPOOL_SIZE: '64' });
    entry = { role, domid: 0, pid: s.pid, run: h.managerRunDir };
  } else {
    // The backend reads host.json to find the others: write what is up so far first.
    rd.writeHost(h);
    const s = await startDaemon(['backend', '--run', rd.dir, ...logArgs], rd.log('backend'), /vtpm-backend: ready/, engineEnv({ ...process.env, ...env }));
    entry = { role, domid: 0, pid: s.pid, mode: h.mode };
    // The backend (re)creates the vTPM-domain register dir: give it the mode the isolation needs.
    secureHost(h, 'backend');
  }
  const i = h.processes.findIndex((p) => p.role === role);
  if (i >= 0) h.processes[i] = entry;
  else h.processes.push(entry);
  // Keep host.json in start order whatever order roles were (re)started in.
  h.processes.sort((a, b) => order(a.role) - order(b.role));
  rd.writeHost(h);
  return entry;
}

function order(role: string): number {
  const i = (DAEMON_ROLES as readonly string[]).indexOf(role);
  return i < 0 ? DAEMON_ROLES.length : i;
}

/**
 * Restart one dead daemon of a running host (`host restart ROLE`, vtpm stress, which kills it just
 * before: a killed process may take a moment to be reaped, so a live one is waited for up to 5 s).
 */
export async function restartDaemon(run: string, role: DaemonRole): Promise<number> {
  const rd = new RunDir(run);
  const h = rd.readHost();
  const old = h.processes.find((q) => q.role === role);
  if (old) for (let i = 0; i < 500 && alive(old.pid); i++) await sleep(10);
  if (old && alive(old.pid)) throw new CliError('CONFLICT', `the ${role} (pid ${old.pid}) is running; only a dead daemon is restarted (\`vtpm host down\` stops them all)`);
  if (role === 'manager' || role === 'backend') {
    for (const base of ['hypervisor', 'xenstored'] as const) {
      const p = h.processes.find((q) => q.role === base);
      const what = base === 'hypervisor' ? 'every domain' : 'every device';
      if (!p || !alive(p.pid)) throw new CliError('HOST_DOWN', `${base} is dead: ${what} went with it; \`vtpm host up --run ${rd.dir} --state ${h.stateDir}\` recovers the whole host`);
    }
  } else if (h.processes.some((p) => p.role !== role && alive(p.pid))) {
    const lived = role === 'hypervisor' ? 'their domains lived in it' : 'their devices lived in it';
    throw new CliError('CONFLICT', `${role} cannot be restarted under live daemons (${lived}); \`vtpm host down\` then \`host up\``);
  }
  return (await startRole(rd, h, role)).pid;
}
