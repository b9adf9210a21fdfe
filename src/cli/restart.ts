// Restarting one of a host's daemons after it died (vtpm stress kills them with -9): the same command
// line `host up` uses, and host.json updated so `host down` stops the new process.
import { setTimeout as sleep } from 'node:timers/promises';
import { RunDir, alive } from './rundir.js';
import { startDaemon } from './spawn.js';
import { secureHost } from './isolation.js';
import { engineEnv } from '../tpm/threadpool.js';

export async function restartDaemon(run: string, role: 'backend' | 'manager'): Promise<number> {
  const rd = new RunDir(run);
  const h = rd.readHost();
  // A killed process may take a moment to be reaped; its successor claims its domain/FIFOs after.
  for (const p of h.processes.filter((q) => q.role === role)) {
    for (let i = 0; i < 500 && alive(p.pid); i++) await sleep(10);
  }
  const env = { VTPM_XEN_DIR: h.xenDir };
  const started =
    role === 'manager'
      ? await startDaemon(['manager', '--state', h.stateDir, '--run', h.managerRunDir], rd.log('manager'), /vtpm-manager: ready/, { ...env, UV_THREADPOOL_SIZE: '64' })
      : await startDaemon(['backend', '--run', rd.dir], rd.log('backend'), /vtpm-backend: ready/, engineEnv({ ...process.env, ...env }));
  // A new backend re-created the vTPM-domain register dir: give it the mode `host up` gave.
  if (role === 'backend') secureHost(h, 'backend');
  const cur = rd.readHost();
  cur.processes = cur.processes.map((p) => (p.role === role ? { ...p, pid: started.pid } : p));
  rd.writeHost(cur);
  return started.pid;
}
