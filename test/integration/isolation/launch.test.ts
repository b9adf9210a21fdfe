// How domains are started: under their own uid (base + domid) with no_new_privs and no capabilities
// when root starts the host, root-only host files, vTPM domains with their manager pair as inherited
// descriptors, `host status` saying which isolation is in force, and `isolation: none` (with the
// reason) when the host cannot have it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { freePortPair } from '../../../src/cli/ports.js';
import { RunDir, alive } from '../../../src/cli/rundir.js';
import { DEFAULT_UID_BASE, IsolationError, decideIsolation } from '../../../src/cli/isolation.js';
import { ROOT } from '../../helpers/child.js';
import { run, status, tcti, vtpm } from '../multivm/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const procStatus = (pid: number): string => fs.readFileSync(`/proc/${pid}/status`, 'latin1');
const field = (pid: number, name: string): string => new RegExp(`^${name}:\\s+(.*)$`, 'm').exec(procStatus(pid))![1]!.trim();
const mode = (p: string): number => fs.statSync(p).mode & 0o7777;

function reachableWork(): string {
  const work = tempDir('iso-launch', '/var/tmp');
  fs.chmodSync(work, 0o711);
  return work;
}

describe('decideIsolation', () => {
  it('falls back to none with the reason when the run dir is behind a 0700 directory, and --isolation uid refuses', () => {
    const hidden = tempDir('iso-hidden');
    try {
      expect(mode(hidden)).toBe(0o700);
      const iso = decideIsolation('auto', join(hidden, 'run'));
      expect(iso.mode).toBe('none');
      expect(iso.reason).toContain(`${hidden} (on the way to the run dir) is not searchable by other uids`);
      expect(() => decideIsolation('uid', join(hidden, 'run'))).toThrow(IsolationError);
      expect(decideIsolation('auto', '/var/tmp/x/run')).toEqual({ mode: 'uid', uidBase: DEFAULT_UID_BASE, reason: '' });
    } finally {
      removeDir(hidden);
    }
  });
});

describe('a host started by root, single-VM', () => {
  let work = '';
  let runDir = '';
  let port = 0;

  beforeAll(async () => {
    work = reachableWork();
    runDir = join(work, 'run');
    await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--uid-base', '300000');
    port = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '7', '--vm', randomUUID(), '--tcti-port', String(port));
  });

  afterAll(async () => {
    if (!work) return;
    await vtpm('host', 'down', '--run', runDir).catch(() => {});
    removeDir(work);
  });

  it('runs the guest as uid/gid base+domid with no_new_privs, no capabilities and only its groups', async () => {
    const s = await status(runDir);
    const g = s.processes.find((p) => p.role === 'guest')!;
    expect(field(g.pid, 'Uid')).toBe('300007\t300007\t300007\t300007');
    expect(field(g.pid, 'Gid')).toBe('300007\t300007\t300007\t300007');
    expect(field(g.pid, 'Groups')).toBe(String(300000 + 0x7ff1));
    expect(field(g.pid, 'NoNewPrivs')).toBe('1');
    for (const c of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) expect(field(g.pid, c)).toBe('0000000000000000');
    expect(field(g.pid, 'Seccomp')).toBe('2'); // filter mode
    // …and the guest still works: its TPM answers through its TCTI port.
    await run('tpm2_startup', ['-c'], { env: tcti(port) });
    const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], { env: tcti(port) });
    expect(stdout).toMatch(/^[0-9a-f]{16}$/);
  });

  it('shows the isolation in host status, in text and JSON, with each process uid', async () => {
    const text = (await vtpm('host', 'status', '--run', runDir)).stdout;
    expect(text).toMatch(/^isolation: uid \(dom<N> runs as uid 300000\+N, no_new_privs, no capabilities, seccomp\)$/m);
    expect(text).toMatch(/^guest +dom7 +pid \d+ +running +.*\buid 300007$/m);
    expect(text).toMatch(/^backend +dom0 +pid \d+ +running +uid 0$/m);
    const json = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as {
      isolation: { mode: string; uidBase: number };
      processes: { role: string; uid: number }[];
    };
    expect(json.isolation).toMatchObject({ mode: 'uid', uidBase: 300000 });
    expect(json.processes.find((p) => p.role === 'guest')!.uid).toBe(300007);
  });

  it('keeps host files root-only and gives the guest its own socket and nothing else', () => {
    const h = new RunDir(runDir).readHost();
    expect(mode(runDir)).toBe(0o711);
    expect(mode(join(runDir, 'host.json'))).toBe(0o600);
    expect(mode(h.stateDir)).toBe(0o700);
    expect(mode(join(h.stateDir, 'master.key'))).toBe(0o600);
    expect(mode(h.managerRunDir)).toBe(0o700);
    expect(mode(join(runDir, 'logs'))).toBe(0o700);
    expect(mode(h.xenDir)).toBe(0o700);
    expect(fs.statSync(h.xenstoredSocket)).toMatchObject({ uid: 0 });
    expect(mode(h.xenstoredSocket)).toBe(0o600);
    const sock = fs.statSync(join(h.domainSocketDir, 'dom7.sock'));
    expect({ uid: sock.uid, gid: sock.gid, mode: sock.mode & 0o777 }).toEqual({ uid: 300007, gid: 300007, mode: 0o600 });
    const rec = fs.statSync(new RunDir(runDir).guestFile(7));
    expect({ uid: rec.uid, mode: rec.mode & 0o777 }).toEqual({ uid: 300007, mode: 0o600 });
  });

  it('suspends and resumes a ring guest under its uid: it rewrites its own record, its PCR survives', async () => {
    const ringPort = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '8', '--vm', randomUUID(), '--protocol', 'ring', '--tcti-port', String(ringPort));
    await run('tpm2_startup', ['-c'], { env: tcti(ringPort) });
    await run('tpm2_pcrextend', [`16:sha256=${'00'.repeat(31)}01`], { env: tcti(ringPort) });
    const pcr = async (): Promise<string> => (await run('tpm2_pcrread', ['sha256:16'], { env: tcti(ringPort) })).stdout;
    const before = await pcr();
    await vtpm('guest', 'suspend', '--run', runDir, '--domid', '8');
    const rd = new RunDir(runDir);
    expect(rd.readGuest(8)?.suspended).toBe(true);
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '8');
    const g = rd.readGuest(8)!;
    expect(g.suspended).toBe(false);
    expect(field(g.pid, 'Uid').split('\t')[0]).toBe('300008');
    expect(fs.statSync(rd.guestFile(8)).uid).toBe(300008);
    // `guest resume` returns once the guest recorded its resume; its TCTI bridge may still be starting.
    let after = '';
    for (let i = 0; i < 50 && !after; i++) after = await pcr().catch(async () => (await new Promise((r) => setTimeout(r, 100)), ''));
    expect(after).toBe(before);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '8');
  });

  it('stops the processes of the guest on detach, not the pid the guest wrote into its own record', async () => {
    const rd = new RunDir(runDir);
    const bystander = spawn('sleep', ['60'], { stdio: 'ignore' });
    const g = rd.readGuest(7)!;
    try {
      // What a hostile guest can do: rewrite its own record (it owns the file) to name another process.
      rd.writeGuest({ ...g, pid: bystander.pid! }, 300007);
      await vtpm('guest', 'detach', '--run', runDir, '--domid', '7');
      expect(bystander.exitCode).toBeNull();
      expect(bystander.signalCode).toBeNull();
      expect(alive(g.pid, g.start)).toBe(false);
    } finally {
      bystander.kill('SIGKILL');
      if (alive(g.pid, g.start)) process.kill(g.pid, 'SIGKILL');
    }
  });
});

describe('a host started by root, multi-VM', () => {
  let work = '';
  let runDir = '';
  let port = 0;

  beforeAll(async () => {
    work = reachableWork();
    runDir = join(work, 'run');
    await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', 'multi', '--uid-base', '400000');
    port = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '3', '--vm', randomUUID(), '--tcti-port', String(port));
    await run('tpm2_startup', ['-c'], { env: tcti(port) });
  });

  afterAll(async () => {
    if (!work) return;
    await vtpm('host', 'down', '--run', runDir).catch(() => {});
    removeDir(work);
  });

  it('runs each vTPM domain under its own uid with its manager pair inherited; the manager dir stays root-only', async () => {
    const before = (await status(runDir)).processes.find((p) => p.role === 'vtpm-domain')!;
    expect(field(before.pid, 'Uid').split('\t')[0]).toBe(String(400000 + before.domid));
    expect(field(before.pid, 'NoNewPrivs')).toBe('1');
    expect(field(before.pid, 'Seccomp')).toBe('2');
    const h = new RunDir(runDir).readHost();
    for (const p of [h.managerRunDir, join(h.managerRunDir, 'clients')]) expect(mode(p)).toBe(0o700);
    // The pair is open in the domain as descriptors 4 and 5 (3 is its hypercall connection).
    expect(fs.readlinkSync(`/proc/${before.pid}/fd/4`)).toBe(join(h.managerRunDir, 'clients', `vtpm-domain-${before.domid}.req.fifo`));
    expect(fs.readlinkSync(`/proc/${before.pid}/fd/5`)).toBe(join(h.managerRunDir, 'clients', `vtpm-domain-${before.domid}.rsp.fifo`));
    await run('tpm2_nvdefine', ['0x1500016', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite'], { env: tcti(port) });
    // Killed, it comes back as a new domain under that domain's uid, from the state the manager kept.
    process.kill(before.pid, 'SIGKILL');
    let after = before;
    for (let i = 0; i < 200 && after.domid === before.domid; i++) {
      await new Promise((r) => setTimeout(r, 50));
      after = (await status(runDir)).processes.find((p) => p.role === 'vtpm-domain' && p.alive) ?? before;
    }
    expect(after.domid).not.toBe(before.domid);
    expect(field(after.pid, 'Uid').split('\t')[0]).toBe(String(400000 + after.domid));
    const { stdout } = await run('tpm2_nvreadpublic', ['0x1500016'], { env: tcti(port) });
    expect(stdout).toContain('0x1500016');
  });
});

describe('a host started by a user other than root', () => {
  let work = '';
  let runDir = '';
  // nobody: owns the run and state dirs it is given, and nothing else.
  const nobody = 65534;

  beforeAll(() => {
    work = reachableWork();
    runDir = join(work, 'run');
    fs.mkdirSync(runDir);
    fs.mkdirSync(join(work, 'state'));
    fs.chownSync(runDir, nobody, nobody);
    fs.chownSync(join(work, 'state'), nobody, nobody);
  });

  afterAll(async () => {
    if (!work) return;
    await asNobody('host', 'down', '--run', runDir).catch(() => {});
    removeDir(work);
  });

  const cli = join(ROOT, 'dist/src/cli/main.js');
  const asNobody = (...args: string[]) =>
    run('setpriv', [`--reuid=${nobody}`, `--regid=${nobody}`, '--clear-groups', '--', process.execPath, cli, ...args], {
      cwd: '/',
      env: { ...process.env, VTPM_NO_SETUP: '1' },
    });

  it('runs without isolation and says so in host up and host status', async () => {
    const up = await asNobody('host', 'up', '--run', runDir, '--state', join(work, 'state'));
    expect(up.stdout).toMatch(/^isolation: none \(host up ran as uid 65534, and only root can start domains under their own uids\)$/m);
    const text = (await asNobody('host', 'status', '--run', runDir)).stdout;
    expect(text).toMatch(/^isolation: none \(host up ran as uid 65534/m);
    const json = JSON.parse((await asNobody('host', 'status', '--run', runDir, '--json')).stdout) as { isolation: { mode: string } };
    expect(json.isolation.mode).toBe('none');
    await expect(asNobody('host', 'down', '--run', runDir)).resolves.toBeTruthy();
    await expect(asNobody('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--isolation', 'uid')).rejects.toThrow(/--isolation uid: host up ran as uid 65534/);
  });
});
