// A host with domains under their own uids, two well-behaved guests whose TPM commands are timed all
// along, and the raw hostile guest (raw-guest.mjs) started as a real guest next to them.
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ROOT } from '../../helpers/child.js';
import { attachGoodGuests } from '../../helpers/host.js';
import { DataClient, rc, vtpm } from '../multivm/host.js';
import { RunDir, alive, type HostInfo } from '../../../src/cli/rundir.js';
import { domainLaunch } from '../../../src/cli/isolation.js';
import { guestDetach } from '../../../src/cli/guest.js';
import { hostStatus } from '../../../src/cli/host.js';
import { connect } from '../../../src/xenstore/client.js';
import { createDomainConnection } from '../../../src/xen/index.js';
import { hypervisorSocket } from '../../../src/xen/hypercall.js';
import { writeDeviceDirectories } from '../../../src/xenstore/xenbus-toolstack.js';
import { requestStubdom } from '../../../src/cli/stubdom.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { afterAll, beforeAll, beforeEach, expect } from 'vitest';

export const RAW_GUEST = join(ROOT, 'test/integration/isolation/raw-guest.mjs');
const GET_RANDOM = Buffer.from(tpm2.getRandom(8));

export interface Outcome {
  case: string;
  target?: string;
  outcome?: 'refused' | 'reached' | 'ok' | 'error';
  code?: string;
  message?: string;
  detail?: unknown;
}

/** Commands one good guest keeps sending while the hostile one works; the slowest and the failures. */
class Load {
  done = 0;
  slowestMs = 0;
  failures: string[] = [];
  #stop = false;
  #loop: Promise<void>;

  constructor(
    readonly domid: number,
    client: DataClient,
  ) {
    this.#loop = (async () => {
      while (!this.#stop) {
        const t0 = performance.now();
        try {
          const rsp = await client.transmit(GET_RANDOM, 10_000);
          if (rc(rsp) !== 0) this.failures.push(`rc 0x${rc(rsp).toString(16)}`);
          else this.done++;
        } catch (err) {
          this.failures.push((err as Error).message);
          await new Promise((r) => setTimeout(r, 100));
        }
        this.slowestMs = Math.max(this.slowestMs, performance.now() - t0);
        await new Promise((r) => setTimeout(r, 5));
      }
      client.close();
    })();
  }

  reset(): void {
    this.done = 0;
    this.slowestMs = 0;
    this.failures = [];
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.#loop;
  }
}

export interface IsolatedHost {
  work: string;
  runDir: string;
  h: HostInfo;
  loads: Load[];
  good: { domid: number; port: number; pid: number }[];
}

/** Under /var/tmp in a 0711 directory: domains must be able to walk to their sockets. */
export async function startHost(mode: 'single' | 'multi' | 'stubdom' = 'single'): Promise<IsolatedHost> {
  const work = tempDir('iso', '/var/tmp');
  fs.chmodSync(work, 0o711);
  const runDir = join(work, 'run');
  const good: IsolatedHost['good'] = [];
  const loads: Load[] = [];
  try {
    // A uid range of its own: test files run side by side, and `host down` stops every process of a
    // domain's uid, so two hosts sharing a range would stop each other's guests.
    const uidBase = 0x50000000 + ((process.pid & 0xfff) << 16);
    await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', mode, '--isolation', 'uid', '--uid-base', String(uidBase));
    for (const { domid, port } of await attachGoodGuests(runDir)) {
      good.push({ domid, port, pid: new RunDir(runDir).readGuest(domid)!.pid });
      loads.push(new Load(domid, await DataClient.connect(port)));
    }
  } catch (err) {
    await stopHost({ work, runDir, loads });
    throw err;
  }
  return { work, runDir, h: new RunDir(runDir).readHost(), loads, good };
}

export async function stopHost(host: Pick<IsolatedHost, 'work' | 'runDir' | 'loads'> | undefined): Promise<void> {
  if (!host) return;
  await Promise.all(host.loads.map((l) => l.stop()));
  await vtpm('host', 'down', '--run', host.runDir).catch(() => {});
  removeDir(host.work);
}

/** Resident set size of a process in bytes (VmRSS), 0 when it is gone. */
export function rss(pid: number): number {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

export function daemons(host: IsolatedHost): { role: string; pid: number }[] {
  return new RunDir(host.runDir).readHost().processes.map((p) => ({ role: p.role, pid: p.pid }));
}

/** vTPM-domain processes (multi-VM mode): other domains, each under its own uid. */
export function vtpmDomains(host: IsolatedHost): { role: string; pid: number }[] {
  return hostStatus(host.runDir)
    .processes.filter((p) => p.role === 'vtpm-domain' && p.alive)
    .map((p) => ({ role: `vtpm-domain dom${p.domid}`, pid: p.pid }));
}

/**
 * Introduce dom<domid> and write its vTPM device directories as `guest attach` does, then run the raw
 * guest as that domain (its own uid) until it exits; resolves with every line it printed.
 */
export async function runRawGuest(host: IsolatedHost, domid: number, mode: string, timeoutMs = 60_000): Promise<Outcome[]> {
  const { h, runDir } = host;
  const rd = new RunDir(runDir);
  const xs = await connect(h.xenstoredSocket);
  try {
    await xs.introduce(domid);
    const vm = randomUUID();
    // Stub-domain mode: the device's backend is the guest's own vTPM domain, started first.
    const back = h.mode === 'stubdom' ? await requestStubdom(xs, { fe: domid, devid: 0, vm, version: '2.0', timeoutMs: 30_000 }) : 0;
    await writeDeviceDirectories(xs, { frontDomid: domid, backDomid: back, devid: 0, uuid: vm, extra: { backend: { 'tpm-version': '2.0' } } });
  } finally {
    await xs.close();
  }
  const cfg = {
    mode,
    domid,
    xsSocket: join(h.domainSocketDir, `dom${domid}.sock`),
    dom0Socket: h.xenstoredSocket,
    hostJson: rd.hostJson,
    runDir,
    stateDir: h.stateDir,
    managerRunDir: h.managerRunDir,
    logDir: rd.logDir,
    guestDir: rd.guestDir,
    xenDir: h.xenDir,
    // What is in the hypervisor dir, as root sees it (the guest cannot list it).
    xenFiles: fs.readdirSync(h.xenDir),
    hypervisorSocket: hypervisorSocket(h.xenDir),
    domainSocketDir: h.domainSocketDir,
    others: host.good.map((g) => ({ domid: g.domid, xsSocket: join(h.domainSocketDir, `dom${g.domid}.sock`), tctiPort: g.port })),
    pids: [...daemons(host), ...host.good.map((g) => ({ role: `guest dom${g.domid}`, pid: g.pid })), ...vtpmDomains(host)],
  };
  // As the toolstack does: the domain is created at the hypervisor, its connection is the guest's fd 3.
  const hvFd = await createDomainConnection({ domid, dir: h.xenDir });
  const l = domainLaunch(h.isolation, domid, 'guest', process.execPath, [RAW_GUEST, JSON.stringify(cfg)]);
  let child;
  try {
    child = spawn(l.file, l.args, { cwd: '/', stdio: ['ignore', 'pipe', 'pipe', hvFd], env: { ...process.env, VTPM_XEN_DIR: h.xenDir, VTPM_HV_FD: '3' } });
  } finally {
    fs.closeSync(hvFd);
  }
  const lines: Outcome[] = [];
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  createInterface({ input: child.stdout! }).on('line', (l) => lines.push(JSON.parse(l) as Outcome));
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  clearTimeout(timer);
  await guestDetach(runDir, domid, 5000).catch(() => {});
  if (!lines.some((o) => o.case === 'done')) throw new Error(`raw guest (${mode}) exited ${code} without finishing:\n${stderr}\n${JSON.stringify(lines)}`);
  return lines;
}

/**
 * A file's hostile cases share one host: started once, loads reset and daemon RSS noted before each case.
 * `othersUnharmed()` is what every case must leave behind: the good guests served throughout (none
 * slower than 2 s), every daemon alive and grown by less than 64 MiB.
 */
export function isolatedSuite(mode: 'single' | 'multi' | 'stubdom' = 'single'): { host: () => IsolatedHost; othersUnharmed: (settleMs?: number) => Promise<void> } {
  let host: IsolatedHost | undefined;
  let rssBefore = new Map<number, number>();
  const current = (): IsolatedHost => {
    if (!host) throw new Error('the isolated host is not up');
    return host;
  };
  beforeAll(async () => {
    host = await startHost(mode);
  });
  afterAll(async () => {
    await stopHost(host);
  });
  beforeEach(() => {
    for (const l of current().loads) l.reset();
    rssBefore = new Map(daemons(current()).map((d) => [d.pid, rss(d.pid)]));
  });
  const othersUnharmed = async (settleMs = 1000): Promise<void> => {
    // Give the loads a moment after the attack so a stall would show.
    await new Promise((r) => setTimeout(r, settleMs));
    const h = current();
    for (const l of h.loads) {
      expect(l.failures, `dom${l.domid}'s commands`).toEqual([]);
      expect(l.done, `dom${l.domid} completed commands`).toBeGreaterThan(0);
      expect(l.slowestMs, `dom${l.domid}'s slowest command (ms)`).toBeLessThan(2000);
    }
    for (const d of daemons(h)) {
      expect(alive(d.pid), `${d.role} (pid ${d.pid}) alive`).toBe(true);
      expect(rss(d.pid) - (rssBefore.get(d.pid) ?? 0), `${d.role} RSS growth`).toBeLessThan(64 << 20);
    }
  };
  return { host: current, othersUnharmed };
}
