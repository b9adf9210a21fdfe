// `host up` brings back a host whose processes all died (kill -9), restarts a single dead daemon, and
// `host status` tells running, suspended and dead guests apart, names the VM each process serves and
// exits non-zero while a daemon the host needs is dead (issue 24 items 9, 12).
import { afterAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { freePortPair } from '../../src/cli/ports.js';
import { DAEMON_ROLES } from '../../src/cli/restart.js';
import { getRandom, gone, ok, status, vtpm } from './cli.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const work = tempDir('cli-host');
const runDir = join(work, 'run');
const stateDir = join(work, 'state');

afterAll(async () => {
  for (const r of [runDir, join(work, 'multi')]) if (fs.existsSync(join(r, 'host.json'))) await vtpm('host', 'down', '--run', r);
  removeDir(work);
});

const pidOf = (s: Awaited<ReturnType<typeof status>>['json'], role: string): number => s.processes.find((p) => p.role === role)!.pid;

describe('host up after a crash', () => {
  it('recovers a run directory whose every process was killed with -9; the VM keeps its vTPM', async () => {
    await ok('host', 'up', '--run', runDir, '--state', stateDir);
    const vm = randomUUID();
    const port = await freePortPair();
    await ok('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vm, '--tcti-port', String(port));
    await getRandom(port);
    const before = (await status(runDir)).json;
    for (const p of before.processes) process.kill(p.pid, 'SIGKILL');
    for (const p of before.processes) await gone(p.pid);

    const crashed = await status(runDir);
    expect(crashed.code).toBe(3);
    expect(crashed.json.processes.map((p) => p.state)).toEqual([...DAEMON_ROLES, 'guest'].map(() => 'dead'));
    expect(crashed.json.dead).toEqual([...DAEMON_ROLES]);

    const up = await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    expect(up.stdout).toMatch(/removed .*manager \(left by the dead host\)/);
    const after = await status(runDir);
    expect(after.code).toBe(0);
    expect(after.json.processes.map((p) => `${p.role} ${p.state}`)).toEqual(DAEMON_ROLES.map((r) => `${r} running`));
    // The crashed guest's domain is gone with its host: the same domid and VM attach again.
    await ok('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vm, '--tcti-port', String(port));
    expect(await getRandom(port)).toMatch(/^[0-9a-f]{16}$/);
  });

  it('restarts a single dead daemon: `host restart ROLE` and `host up`, and status shows it', async () => {
    const s0 = (await status(runDir)).json;
    process.kill(pidOf(s0, 'backend'), 'SIGKILL');
    await gone(pidOf(s0, 'backend'));
    const dead = await vtpm('host', 'status', '--run', runDir);
    expect(dead.code).toBe(3);
    expect(dead.stdout).toMatch(/^backend +dom0 +pid \d+ +dead/m);
    expect(dead.stdout).toMatch(/backend is dead: .*host restart backend/);
    // Commands that need the backend say so instead of waiting for it.
    const attach = await vtpm('guest', 'attach', '--run', runDir, '--domid', '4', '--vm', randomUUID());
    expect(attach.code).toBe(1);
    expect(attach.stderr).toMatch(/^vtpm: the host's backend \(pid \d+\) is dead; `vtpm host up --run .* --state .*` restarts it/);

    expect(await ok('host', 'restart', 'backend', '--run', runDir)).toMatch(/backend restarted \(pid \d+\)/);
    const s1 = await status(runDir);
    expect(s1.code).toBe(0);
    expect(pidOf(s1.json, 'backend')).not.toBe(pidOf(s0, 'backend'));

    // A live daemon is not restarted.
    const live = await vtpm('host', 'restart', 'backend', '--run', runDir);
    expect(live.code).toBe(1);
    expect(live.stderr).toMatch(/backend \(pid \d+\) is running/);
    expect((await vtpm('host', 'restart', 'bogus', '--run', runDir)).stderr).toMatch(new RegExp(`ROLE must be one of ${DAEMON_ROLES.join(', ')}, not bogus`));

    process.kill(pidOf(s1.json, 'manager'), 'SIGKILL');
    await gone(pidOf(s1.json, 'manager'));
    const up = await ok('host', 'up', '--run', runDir, '--state', stateDir);
    expect(up).toMatch(/restarted manager \(pid \d+\); it was dead/);
    const s2 = await status(runDir);
    expect(s2.code).toBe(0);
    expect(s2.json.processes.filter((p) => p.role !== 'guest').every((p) => p.state === 'running')).toBe(true);
    // The guest attached before both restarts still gets answers.
    const g = s2.json.processes.find((p) => p.role === 'guest')!;
    expect(g.state).toBe('running');
    // A host that is up is not started twice.
    expect((await vtpm('host', 'up', '--run', runDir, '--state', stateDir)).stderr).toMatch(/a host is already up/);
  });
});

describe('host status', () => {
  it('tells a suspended guest from a crashed one and names the VM of each', async () => {
    const vmA = randomUUID();
    const vmB = randomUUID();
    await ok('guest', 'attach', '--run', runDir, '--domid', '2', '--vm', vmA, '--protocol', 'ring');
    await ok('guest', 'attach', '--run', runDir, '--domid', '3', '--vm', vmB, '--protocol', 'ring');
    await ok('guest', 'suspend', '--run', runDir, '--domid', '2');
    const s = (await status(runDir)).json;
    const dom3 = s.processes.find((p) => p.role === 'guest' && p.domid === 3)!;
    process.kill(dom3.pid, 'SIGKILL');
    await gone(dom3.pid);
    const text = await vtpm('host', 'status', '--run', runDir);
    // Guests are not daemons the host needs: their state does not fail the command.
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(new RegExp(`^guest +dom2 +pid \\d+ +suspended +VM ${vmA}`, 'm'));
    expect(text.stdout).toMatch(new RegExp(`^guest +dom3 +pid \\d+ +dead +VM ${vmB}`, 'm'));
    const j = (await status(runDir)).json;
    expect(j.processes.filter((p) => p.role === 'guest').map((p) => [p.domid, p.state, p.vm])).toEqual(
      expect.arrayContaining([
        [2, 'suspended', vmA],
        [3, 'dead', vmB],
      ]),
    );
    await ok('guest', 'detach', '--run', runDir, '--domid', '3');
  });

  it('names the VM and the guest each vTPM domain serves (multi-VM mode)', async () => {
    const multi = join(work, 'multi');
    await ok('host', 'up', '--run', multi, '--state', join(work, 'multi-state'), '--mode', 'multi');
    const vm = randomUUID();
    await ok('guest', 'attach', '--run', multi, '--domid', '5', '--vm', vm, '--protocol', 'ring');
    const text = await ok('host', 'status', '--run', multi);
    expect(text).toMatch(new RegExp(`^vtpm-domain +dom\\d+ +pid \\d+ +running +vTPM \\d+  VM ${vm}  serves dom5( |$)`, 'm'));
    const d = (await status(multi)).json.processes.find((p) => p.role === 'vtpm-domain')!;
    expect([d.vm, d.serves]).toEqual([vm, 5]);
    await ok('host', 'down', '--run', multi);
  });
});
