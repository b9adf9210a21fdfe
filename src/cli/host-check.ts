// Commands that need a running host check it first, so a dead daemon is named with what to do instead
// of surfacing later as a timeout.
import { RunDir, alive, type HostInfo, type ProcessEntry } from './rundir.js';
import { CliError } from './errors.js';

export function readHostAlive(rd: RunDir, roles: ProcessEntry['role'][]): HostInfo {
  const h = rd.readHost();
  for (const role of roles) {
    const p = h.processes.find((q) => q.role === role);
    if (!p) throw new CliError('HOST_DOWN', `the host in ${rd.dir} has no ${role}; run \`vtpm host up --run ${rd.dir} --state ${h.stateDir}\``);
    if (!alive(p.pid)) {
      throw new CliError('HOST_DOWN', `the host's ${role} (pid ${p.pid}) is dead; \`vtpm host up --run ${rd.dir} --state ${h.stateDir}\` restarts it`);
    }
  }
  return h;
}
