// Hosts (`vtpm host up --store etcd://…`: two single-VM, one multi-VM; their own xenstoreds, managers and backends) sharing a real
// 3-member etcd cluster on loopback, started here and killed after. A VM's vTPM moves between them by
// detach and attach; only one host at a time may hold it (lease-backed claims); a host paused past its
// lease TTL loses it and cannot write any more; with etcd down saves fail and come back with it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, tcti, until, vtpm } from '../../helpers/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { RunDir } from '../../../src/cli/rundir.js';
import { ManagerClient, ManagerError } from '../../../src/manager/client.js';
import { Status } from '../../../src/manager/wire.js';
import { EtcdCluster } from '../../../scripts/bench/_etcd.js';

const TTL = 4;

const work = tempDir('etcd-hosts');
const key = join(work, 'master.key');
const hosts = {
  a: { run: join(work, 'a-run'), state: join(work, 'a-state'), mode: 'single' },
  b: { run: join(work, 'b-run'), state: join(work, 'b-state'), mode: 'single' },
  m: { run: join(work, 'm-run'), state: join(work, 'm-state'), mode: 'multi' },
};
let etcd: EtcdCluster;

/** Attaches a guest with a TCTI port and starts its TPM. */
async function attach(h: { run: string }, domid: number, vm: string): Promise<NodeJS.ProcessEnv> {
  const port = await freePortPair();
  await vtpm('guest', 'attach', '--run', h.run, '--domid', String(domid), '--vm', vm, '--tcti-port', String(port));
  return tcti(port);
}
const nvRead = async (env: NodeJS.ProcessEnv, index: string, size: number) => (await run('tpm2_nvread', [index, '-C', 'o', '-s', String(size)], { env })).stdout;
const nvWrite = (env: NodeJS.ProcessEnv, index: string, data: string) =>
  run('bash', ['-c', 'printf "%s" "$1" | tpm2_nvwrite -Q "$2" -C o -i -', 'nvwrite', data, index], { env, timeout: 120_000 });
const managerLog = (h: { run: string }) => fs.readFileSync(join(h.run, 'logs', 'manager.log'), 'utf8');
/** The host's manager and backend processes (what a paused or partitioned host stops). */
const daemons = (h: { run: string }) => new RunDir(h.run).readHost().processes.filter((p) => p.role === 'manager' || p.role === 'backend').map((p) => p.pid);

beforeAll(async () => {
  etcd = await EtcdCluster.start(3, { dir: join(work, 'etcd') });
  fs.writeFileSync(key, randomBytes(32), { mode: 0o600 });
  for (const h of Object.values(hosts)) await vtpm('host', 'up', '--run', h.run, '--state', h.state, '--mode', h.mode, '--store', etcd.url, '--master-key', key, '--lease-ttl', String(TTL));
}, 120_000);

afterAll(async () => {
  for (const h of Object.values(hosts)) {
    for (const pid of (() => { try { return daemons(h); } catch { return []; } })()) try { process.kill(pid, 'SIGCONT'); } catch { /* gone */ }
    await vtpm('host', 'down', '--run', h.run).catch(() => {});
  }
  await etcd?.stop();
  removeDir(work);
}, 120_000);

describe('vTPM state in etcd shared by two hosts', () => {
  it('an NV index written on host A is read on host B after detach/attach, with one etcd member killed; B is refused while A holds the VM', async () => {
    const vm = randomUUID();
    const secret = randomBytes(16).toString('hex');
    const envA = await attach(hosts.a, 5, vm);
    await run('tpm2_startup', ['-c'], { env: envA });
    await run('tpm2_nvdefine', ['-Q', '0x1500022', '-C', 'o', '-s', '32', '-a', 'ownerread|ownerwrite'], { env: envA });
    await nvWrite(envA, '0x1500022', secret);

    // While A holds the VM, B's manager refuses it, naming A.
    const cb = await ManagerClient.connect(join(hosts.b.run, 'manager'));
    try {
      const err = await cb.open({ vmUuid: vm, version: '2.0' }).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(ManagerError);
      expect((err as ManagerError).status).toBe(Status.AUTHFAIL);
    } finally {
      cb.disconnect();
    }
    expect(managerLog(hosts.b)).toMatch(new RegExp(`vm ${vm} is held by host "[^"]*${hosts.a.run}/manager"`));
    await expect(vtpm('guest', 'attach', '--run', hosts.b.run, '--domid', '6', '--vm', vm)).rejects.toThrow(/is held by host ".*a-run\/manager"/);

    await etcd.kill(0); // quorum is 2 of 3: everything below goes on
    await vtpm('guest', 'detach', '--run', hosts.a.run, '--domid', '5');
    const envB = await attach(hosts.b, 7, vm);
    await run('tpm2_startup', ['-c'], { env: envB });
    expect(await nvRead(envB, '0x1500022', 32)).toBe(secret);
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '7');
    etcd.restart(0);
    await etcd.waitHealthy(30_000);
  }, 300_000);

  it('a VM moves from a multi-VM host (its vTPM in a vTPM-domain process) to a single-VM host', async () => {
    const vm = randomUUID();
    const envM = await attach(hosts.m, 41, vm);
    await run('tpm2_startup', ['-c'], { env: envM });
    await run('tpm2_nvdefine', ['-Q', '0x1500026', '-C', 'o', '-s', '4', '-a', 'ownerread|ownerwrite'], { env: envM });
    await nvWrite(envM, '0x1500026', 'mvm!');
    await vtpm('guest', 'detach', '--run', hosts.m.run, '--domid', '41');
    const envB = await attach(hosts.b, 42, vm);
    await run('tpm2_startup', ['-c'], { env: envB });
    expect(await nvRead(envB, '0x1500026', 4)).toBe('mvm!');
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '42');
  }, 300_000);

  it('a host whose manager was killed -9 takes its own claims over when it comes back; its guest goes on', async () => {
    const vm = randomUUID();
    const env = await attach(hosts.a, 31, vm);
    await run('tpm2_startup', ['-c'], { env });
    await run('tpm2_nvdefine', ['-Q', '0x1500025', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite'], { env });
    const mgr = new RunDir(hosts.a.run).readHost().processes.find((p) => p.role === 'manager')!.pid;
    process.kill(mgr, 'SIGKILL');
    await sleep(200);
    // Its lease still lives in etcd: the new manager (same host name) takes the claim over, B may not.
    expect((await vtpm('host', 'up', '--run', hosts.a.run, '--state', hosts.a.state)).stdout).toMatch(/restarted manager/);
    await until(() => nvWrite(env, '0x1500025', 'restart!'), 'a write after the manager restarted', 20_000);
    expect(await nvRead(env, '0x1500025', 8)).toBe('restart!');
    expect(managerLog(hosts.a)).toMatch(new RegExp(`claimed vm ${vm}`));
    await expect(vtpm('guest', 'attach', '--run', hosts.b.run, '--domid', '32', '--vm', vm)).rejects.toThrow(/is held by host/);
    await vtpm('guest', 'detach', '--run', hosts.a.run, '--domid', '31');
  }, 300_000);

  it('host A paused past the lease TTL: B takes the VM over; A, resumed, cannot write and its guest gets failures', async () => {
    const vm = randomUUID();
    const envA = await attach(hosts.a, 11, vm);
    await run('tpm2_startup', ['-c'], { env: envA });
    await run('tpm2_nvdefine', ['-Q', '0x1500023', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite'], { env: envA });
    await nvWrite(envA, '0x1500023', 'AAAAAAAA');

    const paused = daemons(hosts.a);
    for (const pid of paused) process.kill(pid, 'SIGSTOP');
    try {
      await sleep((TTL + 3) * 1000); // the lease expires in etcd: A's claim on the VM goes with it
      const envB = await attach(hosts.b, 12, vm);
      await run('tpm2_startup', ['-c'], { env: envB });
      expect(await nvRead(envB, '0x1500023', 8)).toBe('AAAAAAAA');
      await nvWrite(envB, '0x1500023', 'BBBBBBBB');
    } finally {
      for (const pid of paused) process.kill(pid, 'SIGCONT');
    }
    // A's guest writes: A's manager refuses the save (its claim is gone), the guest gets a failure.
    await expect(nvWrite(envA, '0x1500023', 'CCCCCCCC')).rejects.toThrow();
    expect(managerLog(hosts.a)).toMatch(/no longer holds vm .*write refused/);
    // Nothing A tried reached etcd: B still reads its own write.
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '12');
    const envB3 = await attach(hosts.b, 13, vm);
    await run('tpm2_startup', ['-c'], { env: envB3 });
    expect(await nvRead(envB3, '0x1500023', 8)).toBe('BBBBBBBB');
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '13');
    await vtpm('guest', 'detach', '--run', hosts.a.run, '--domid', '11').catch(() => {});
  }, 300_000);

  it('etcd entirely down: the guest gets failure answers; once etcd is back, writes work and nothing is corrupt', async () => {
    const vm = randomUUID();
    const env = await attach(hosts.a, 21, vm);
    await run('tpm2_startup', ['-c'], { env });
    await run('tpm2_nvdefine', ['-Q', '0x1500024', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite'], { env });
    await nvWrite(env, '0x1500024', 'before!!');

    await etcd.killAll();
    try {
      await expect(nvWrite(env, '0x1500024', 'during!!')).rejects.toThrow();
    } finally {
      etcd.restartAll();
      await etcd.waitHealthy(60_000);
    }
    expect(managerLog(hosts.a)).toMatch(/etcd did not answer/);
    // Service returns: the claim survived (etcd keeps leases across its restart); the failed write never
    // became durable, and writes are durable again.
    // The backend rebuilt the vTPM from its last durable state (a TPM reset): the guest starts it again.
    await until(() => run('tpm2_startup', ['-c'], { env }), 'the vTPM back after etcd', 20_000);
    expect(await nvRead(env, '0x1500024', 8)).toBe('before!!');
    await nvWrite(env, '0x1500024', 'after!!!');
    expect(await nvRead(env, '0x1500024', 8)).toBe('after!!!');
    await vtpm('guest', 'detach', '--run', hosts.a.run, '--domid', '21');
    const env2 = await attach(hosts.b, 22, vm);
    await run('tpm2_startup', ['-c'], { env: env2 });
    expect(await nvRead(env2, '0x1500024', 8)).toBe('after!!!');
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '22');
  }, 300_000);
});
