// `vtpm guest attach|detach|run`: the toolstack's side of a guest's vTPM (introduce the domain, write
// the device directories as libxl does, start the guest, run the close sequence) and the guest process
// itself (a frontend domain with its vTPM device, optionally exposed to tpm2-tools).
import type { Command } from 'commander';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import net from 'node:net';
import { Domain } from '../xen/index.js';
import { connect, type XsClient } from '../xenstore/client.js';
import { readState, vtpmDevice, type VtpmDevice, waitForState, XenbusState } from '../xenstore/xenbus.js';
import { deviceOf, removeDeviceDirectories, writeDeviceDirectories } from '../xenstore/xenbus-toolstack.js';
import { removeStubdom, requestStubdom, stubdomNode } from './stubdom.js';
import { addEkOptions, ekChoice, openWithEk, type EkFlags } from './ek.js';
import type { EkCode } from '../manager/wire.js';
import { CliError, fileSize, managerReason, openRefusal } from './errors.js';
import { readHostAlive } from './host-check.js';
import { runGuest, type GuestProcessOptions } from '../frontend/guest-main.js';
import type { Protocol } from '../frontend/tpmfront.js';
import { MISBEHAVIOURS, misbehave, type Misbehaviour } from '../frontend/hostile.js';
import { RunDir, alive, procStat, type GuestInfo } from './rundir.js';
import { guestOwner, guestSocket, spawnGuestProcess, stopProcess, tailFile } from './spawn.js';
import { domainProcesses, ownUidOrRoot } from './isolation.js';
import { journalPath, type WorkloadSpec } from './stress-workload.js';
import { onStop } from './lifecycle.js';
import { registerSuspend } from './suspend.js';
import { captureKeys } from './capture-opts.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export interface AttachOptions {
  run: string;
  domid: number;
  vm: string;
  protocol?: Protocol;
  tctiPort?: number;
  version?: '2.0' | '1.2';
  devid?: number;
  timeoutMs?: number;
  /** Fault injection: the guest commits this protocol violation once connected (see frontend/hostile.ts). */
  misbehave?: Misbehaviour;
  /** A vtpm stress workload file the guest runs (ring protocol). */
  workload?: string;
  /** false: the guest does not start a TPM that was never started (`--no-startup`). */
  startup?: boolean;
  /** EK certificates of a new VM's TPM (`--ek-profile`, `--no-ek-cert`); absent: the manager's default. */
  ek?: EkCode;
  /** The backend captures this guest's traffic to this pcapng file (docs/observability.md), at most pcapMaxMb MiB. */
  pcap?: string;
  pcapMaxMb?: number;
}

export async function guestAttach(o: AttachOptions): Promise<GuestInfo> {
  if (!Number.isInteger(o.domid) || o.domid < 1 || o.domid > 0x7fef) throw new CliError('USAGE', `--domid must be 1..32751, not ${o.domid}`);
  if (!UUID.test(o.vm)) throw new CliError('USAGE', `--vm must be a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx), not ${o.vm}`);
  const rd = new RunDir(o.run);
  const h = readHostAlive(rd, ['xenstored', 'manager', 'backend']);
  const vm = o.vm.toLowerCase();
  const devid = o.devid ?? 0;
  const protocol = o.protocol ?? 'v2';
  // Everything that can be checked before anything starts: nothing to undo then.
  const existing = rd.readGuest(o.domid);
  if (existing?.suspended) throw new CliError('CONFLICT', `dom${o.domid} is suspended (VM ${existing.vm}): resume it with \`vtpm guest resume\` or detach it first`);
  if (existing && alive(existing.pid, existing.start)) throw new CliError('CONFLICT', `dom${o.domid} is already attached (pid ${existing.pid}, VM ${existing.vm})`);
  const other = rd.guests().find((g) => g.vm === vm && g.domid !== o.domid && (g.suspended || alive(g.pid, g.start)));
  if (other) {
    throw new CliError('CONFLICT', `VM ${vm} is already attached to dom${other.domid}${other.suspended ? ' (suspended)' : ''}: one VM's vTPM serves one guest; detach dom${other.domid} first`);
  }
  if (o.tctiPort !== undefined) await checkPortPair(o.tctiPort);
  if (o.ek !== undefined) await openWithEk(h, rd.log('manager'), vm, o.version ?? '2.0', o.ek);
  const capture = captureKeys(o.pcap, o.pcapMaxMb);
  const xs = await connect(h.xenstoredSocket);
  // Stub-domain mode: the device's backend is the guest's own vTPM domain, started before the device.
  const stubdom = h.mode === 'stubdom';
  let dev = vtpmDevice(o.domid, devid, 0);
  let requested = false;
  const mgrLog = rd.log('manager');
  const mgrLogFrom = fileSize(mgrLog);
  let introduced = false;
  let wrote = false;
  let pid = -1;
  let log = '';
  try {
    if ((await readState(xs, dev.backend)) !== XenbusState.Unknown || (await xs.tryRead(`${dev.frontend}/state`)) !== undefined) {
      throw new CliError('CONFLICT', `dom${o.domid} already has vTPM device ${devid} in xenstore (${dev.backend}); \`vtpm guest detach --domid ${o.domid}\` removes it`);
    }
    if (stubdom && (await xs.tryRead(`${stubdomNode(o.domid, devid)}/state`)) !== undefined) {
      throw new CliError('CONFLICT', `dom${o.domid} already has a vTPM domain for device ${devid} (${stubdomNode(o.domid, devid)}); \`vtpm guest detach --domid ${o.domid}\` removes it`);
    }
    if (!(await xs.isDomainIntroduced(o.domid))) {
      await xs.introduce(o.domid);
      introduced = true;
    }
    if (stubdom) {
      requested = true;
      const back = await requestStubdom(xs, { fe: o.domid, devid, vm, version: o.version ?? '2.0', timeoutMs: o.timeoutMs ?? 30_000 });
      dev = vtpmDevice(o.domid, devid, back);
    }
    wrote = true;
    await writeDeviceDirectories(xs, {
      frontDomid: o.domid,
      backDomid: dev.backDomid,
      devid,
      uuid: vm,
      extra: { backend: { 'tpm-version': o.version ?? '2.0', ...capture } },
    });
    log = rd.log(`guest-${o.domid}`);
    // The log is appended to by every incarnation of this domid: look only at what this one writes.
    const logStart = fileSize(log);
    const owner = guestOwner(h, o.domid);
    const args = ['guest', 'run', '--run', rd.dir, '--domid', String(o.domid), '--protocol', protocol, '--devid', String(devid), '--xs-socket', guestSocket(h, o.domid)];
    if (o.tctiPort !== undefined) args.push('--tcti-port', String(o.tctiPort));
    if (o.misbehave) args.push('--misbehave', o.misbehave);
    if (o.workload !== undefined) {
      args.push('--workload', o.workload);
      if (owner !== undefined) giveJournal(o.workload, o.domid, owner);
    }
    if (o.startup === false) args.push('--no-startup');
    const child = await spawnGuestProcess(h, o.domid, args, log);
    pid = child.pid ?? -1;
    const start = procStat(pid)?.start;
    const info: GuestInfo = {
      domid: o.domid,
      pid,
      ...(start !== undefined ? { start } : {}),
      vm,
      protocol,
      devid,
      ...(o.tctiPort !== undefined ? { tctiPort: o.tctiPort } : {}),
      ...(o.workload !== undefined ? { workload: o.workload } : {}),
    };
    rd.writeGuest(info, owner);
    const guestLog = log;
    const exited = new Promise<never>((_, reject) =>
      child.once('exit', (code, sig) => reject(new CliError('FAILED', `guest dom${o.domid} exited (${sig ?? code}) before connecting:\n${tailFile(guestLog)}`))),
    );
    exited.catch(() => {});
    const connected = waitConnected(xs, dev, o.timeoutMs ?? 30_000);
    connected.catch(() => {});
    // A guest that exits at the backend's refusal can beat our own read of it: the refusal (its reason
    // in the backend's error node) says more than the exit, so give that read a moment to land.
    const exitedOrRefused = exited.catch(async (err: unknown) => {
      const settled = await Promise.race([connected.then(() => undefined, (e: unknown) => e), new Promise((r) => setTimeout(r, 2000, undefined))]);
      throw settled instanceof CliError && settled.code === 'REFUSED' ? settled : err;
    });
    await Promise.race([connected, exitedOrRefused]).catch((err: unknown) => {
      // The manager's reason for refusing the vTPM (migrated out, …) says more than its status.
      const why = managerReason(mgrLog, mgrLogFrom, 'OPEN');
      if (!(err instanceof CliError) || err.code !== 'REFUSED' || why === undefined) throw err;
      throw openRefusal(vm, err.message, why);
    });
    // The guest reports its TCTI bridge ready in its log; wait for that too so callers can use it.
    if (o.tctiPort !== undefined) await waitForLine(log, new RegExp(`tcti bridge listening on 127\\.0\\.0\\.1:${o.tctiPort}`), pid, logStart);
    return info;
  } catch (err) {
    // Undo all of it: the guest, its device (the close sequence releases the vTPM at the manager), the
    // domain, its memory, its record.
    if (pid > 0) await stopProcess(pid, 2000);
    // The guest is gone: as for a destroyed domain, its frontend directory goes first so the backend
    // closes without waiting for a frontend that will never answer, then releases the vTPM.
    if (introduced) await xs.release(o.domid).catch(() => {});
    if (wrote) {
      await xs.rm(dev.frontend).catch(() => {});
      if (!(await closeDevice(xs, dev, 10_000).catch(() => false))) process.stderr.write(`vtpm guest attach: the backend did not close ${dev.backend}; removing it anyway\n`);
    }
    await removeDeviceDirectories(xs, dev).catch(() => {});
    if (requested) await removeStubdom(xs, o.domid, devid).catch(() => {});
    await removeDomainNodes(xs, o.domid).catch(() => {});
    if (pid > 0) rd.removeGuest(o.domid);
    throw err instanceof CliError ? err : new CliError('FAILED', `attach of dom${o.domid} failed: ${(err as Error).message}`);
  } finally {
    await xs.close();
  }
}

/** The stress journal is the guest's to append to; the journal dir stays root's. */
function giveJournal(specFile: string, domid: number, owner: number): void {
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8')) as WorkloadSpec;
  const file = journalPath(spec, domid);
  fs.closeSync(fs.openSync(file, 'a', 0o600));
  fs.chownSync(file, owner, owner);
}

/** Connected, or the backend's refusal (its error node, Linux's xenbus_dev_fatal) as the error. */
async function waitConnected(xs: XsClient, dev: VtpmDevice, timeoutMs: number): Promise<void> {
  const failed = (s: XenbusState): boolean => s === XenbusState.Closing || s === XenbusState.Closed;
  const be = await waitForState(xs, dev.backend, (s) => s === XenbusState.Connected || failed(s), { timeoutMs }).catch(async (err: unknown) => {
    throw new CliError('FAILED', `the backend did not connect the device in ${timeoutMs} ms (${(err as Error).message}); is it running? see \`vtpm host status\``);
  });
  if (failed(be)) throw new CliError('REFUSED', `the backend refused the device: ${await backendError(xs, dev)}`);
  const fe = await waitForState(xs, dev.frontend, (s) => s === XenbusState.Connected || failed(s), { timeoutMs });
  if (failed(fe)) throw new CliError('FAILED', `the guest's frontend closed the device: ${await backendError(xs, dev)}`);
}

async function backendError(xs: XsClient, dev: VtpmDevice): Promise<string> {
  const e = await xs.tryRead(`/local/domain/${dev.backDomid}/error/backend/vtpm/${dev.frontDomid}/${dev.devid}/error`);
  // "<errno> <message>" as xenbus_dev_fatal writes it.
  return e ? e.replace(/^\d+ /, '') : 'no reason given (see the backend log)';
}

/** What libxl removes when it destroys a domain: its home, its backends' directories, its libxl node, the backends' error nodes. */
async function removeDomainNodes(xs: XsClient, domid: number): Promise<void> {
  await xs.transaction(async (tx) => {
    for (const p of [`/local/domain/${domid}`, `/local/domain/0/backend/vtpm/${domid}`, `/local/domain/0/error/backend/vtpm/${domid}`, `/libxl/${domid}`]) {
      await xs.rm(p, tx).catch((err: unknown) => {
        if ((err as { code?: string }).code !== 'ENOENT') throw err;
      });
    }
  });
}

/** As libxl detaches: online=0, then wait (bounded) for the backend to reach Closed. */
async function closeDevice(xs: XsClient, dev: VtpmDevice, timeoutMs: number): Promise<boolean> {
  if ((await readState(xs, dev.backend)) === XenbusState.Unknown) return true;
  await xs.write(`${dev.backend}/online`, '0');
  const s = await waitForState(xs, dev.backend, (st) => st === XenbusState.Closed || st === XenbusState.Unknown, { timeoutMs }).catch(() => null);
  return s !== null;
}

/** P (data) and P+1 (control) must both be free before the guest starts. */
async function checkPortPair(port: number): Promise<void> {
  if (!Number.isInteger(port) || port < 1 || port > 65534) throw new CliError('USAGE', `--tcti-port must be 1..65534 (it uses PORT and PORT+1), not ${port}`);
  for (const p of [port, port + 1]) {
    const s = net.createServer();
    const err = await new Promise<Error | null>((resolve) => {
      s.once('error', resolve);
      s.listen(p, '127.0.0.1', () => resolve(null));
    });
    if (err) throw new CliError('CONFLICT', `--tcti-port ${port}: 127.0.0.1:${p} is taken (${(err as NodeJS.ErrnoException).code ?? err.message}); the bridge needs PORT and PORT+1 free`);
    await new Promise((r) => s.close(r));
  }
}

async function waitForLine(file: string, re: RegExp, pid: number, from: number, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (re.test(fs.readFileSync(file).subarray(from).toString('utf8'))) return;
    if (!alive(pid)) throw new Error(`guest exited:\n${tailFile(file)}`);
    await sleep(20);
  }
  throw new Error(`guest did not report ${re}:\n${tailFile(file)}`);
}

export async function guestDetach(run: string, domid: number, timeoutMs = 15_000): Promise<void> {
  const rd = new RunDir(run);
  const h = rd.readHost();
  const g = rd.readGuest(domid);
  const xs = await connect(h.xenstoredSocket);
  try {
    const dev = await deviceOf(xs, domid, g?.devid ?? 0);
    const introduced = await xs.isDomainIntroduced(domid);
    if (!g && !introduced && (await readState(xs, dev.backend)) === XenbusState.Unknown) {
      throw new CliError('NOT_FOUND', `no guest dom${domid} on this host (\`vtpm host status --run ${rd.dir}\` lists the guests)`);
    }
    // A guest whose process is gone is a dead domain: release it first, as the toolstack destroys a
    // crashed domain, so its frontend directory vanishes and the backend closes without waiting for it.
    if (g && !alive(g.pid, g.start) && introduced) await xs.release(domid);
    if (!(await closeDevice(xs, dev, timeoutMs))) {
      process.stderr.write(`vtpm guest detach: the backend did not close ${dev.backend} in ${timeoutMs} ms; removing the device anyway\n`);
    }
    await removeDeviceDirectories(xs, dev);
    // Stub-domain mode: the guest's vTPM domain goes with its device (state saved first).
    await removeStubdom(xs, domid, dev.devid);
    if (await xs.isDomainIntroduced(domid)) await xs.release(domid);
    await removeDomainNodes(xs, domid);
  } finally {
    await xs.close();
  }
  await Promise.all(domainProcesses(h.isolation, domid, g?.pid).map((pid) => stopProcess(pid, 10_000)));
  rd.removeGuest(domid);
}

export interface GuestRunOptions extends GuestProcessOptions {
  run: string;
  /** Its own xenstore socket (attach passes it; without it the guest looks it up in host.json). */
  xsSocket?: string;
}

/** The guest process: its domain and xenstore connection, then src/frontend/guest-main.ts on them. */
export async function guestRun(o: GuestRunOptions): Promise<void> {
  const rd = new RunDir(o.run);
  // Under isolation host.json is root's: the hypervisor dir comes in VTPM_XEN_DIR, the socket as an option.
  const h = o.xsSocket === undefined ? rd.readHost() : null;
  const dom = await Domain.create({ domid: o.domid, ...(h ? { dir: h.xenDir } : {}) });
  const xs = await connect(o.xsSocket ?? guestSocket(h!, o.domid));
  return runGuest(dom, xs, o, {
    record: { read: () => rd.readGuest(o.domid), write: (g) => rd.writeGuest(g) },
    onStop,
    allowPeer: ownUidOrRoot,
    startWorkload: async (s, spec, domid, log) => (await import('./stress-workload.js')).startWorkload(s, spec, domid, log),
  });
}

const int = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new Error(`not an integer: ${v}`);
  return n;
};

export function register(program: Command): void {
  const guest = program.command('guest').description('attach, detach and run guest domains with a vTPM');
  const attach = guest
    .command('attach')
    .description('introduce the domain, write its vTPM device directories, start the guest; returns once Connected')
    .requiredOption('--run <dir>', 'run directory of the host')
    .requiredOption('--domid <n>', 'the guest domain id (1..32751)', int)
    .requiredOption('--vm <uuid>', 'the VM the vTPM belongs to (the manager keys its vTPM by this)')
    .option('--protocol <p>', 'v2 (tpmif v2 shared page) or ring (multi-request ring)', 'v2')
    .option('--tcti-port <port>', 'serve tpm2-tools on 127.0.0.1:PORT (data) and PORT+1 (control)', int)
    .option('--tpm-version <v>', 'TPM version of a new vTPM: 2.0 or 1.2', '2.0')
    .option('--misbehave <how>', `fault injection once connected: ${MISBEHAVIOURS.join(', ')}`)
    .option('--no-startup', 'do not send Startup(CLEAR) to a TPM that was never started (the guest does, as Linux, by default)')
    .option('--pcap <file>', 'the backend writes this guest\'s TPM commands (TCP port 2321), xenstore traffic and ring events to FILE (pcapng)')
    .option('--pcap-max-mb <n>', 'stop capturing at N MiB (default 100)', int);
  addEkOptions(attach)
    .action(async (o: { run: string; domid: number; vm: string; protocol: string; tctiPort?: number; tpmVersion: string; misbehave?: string; startup: boolean; pcap?: string; pcapMaxMb?: number } & EkFlags) => {
      if (o.protocol !== 'v2' && o.protocol !== 'ring') throw new Error(`--protocol must be v2 or ring, not ${o.protocol}`);
      if (o.tpmVersion !== '2.0' && o.tpmVersion !== '1.2') throw new Error(`--tpm-version must be 2.0 or 1.2`);
      if (o.misbehave !== undefined && !(MISBEHAVIOURS as readonly string[]).includes(o.misbehave)) {
        throw new Error(`--misbehave must be one of ${MISBEHAVIOURS.join(', ')}, not ${o.misbehave}`);
      }
      const g = await guestAttach({
        run: o.run,
        domid: o.domid,
        vm: o.vm,
        protocol: o.protocol,
        tctiPort: o.tctiPort,
        version: o.tpmVersion,
        misbehave: o.misbehave as Misbehaviour | undefined,
        startup: o.startup,
        ek: ekChoice(o, o.tpmVersion),
        ...(o.pcap !== undefined ? { pcap: o.pcap } : {}),
        ...(o.pcapMaxMb !== undefined ? { pcapMaxMb: o.pcapMaxMb } : {}),
      });
      console.log(`dom${g.domid} attached (pid ${g.pid}, ${g.protocol}${g.tctiPort !== undefined ? `, tpm2-tools: -T swtpm:host=127.0.0.1,port=${g.tctiPort}` : ''})`);
    });
  guest
    .command('detach')
    .description('run the close sequence, remove the device and stop the guest')
    .requiredOption('--run <dir>', 'run directory of the host')
    .requiredOption('--domid <n>', 'the guest domain id', int)
    .action(async (o: { run: string; domid: number }) => {
      await guestDetach(o.run, o.domid);
      console.log(`dom${o.domid} detached`);
    });
  guest
    .command('run', { hidden: true })
    .description('the guest process itself (started by attach)')
    .requiredOption('--run <dir>')
    .requiredOption('--domid <n>', '', int)
    .option('--protocol <p>', '', 'v2')
    .option('--devid <n>', '', int, 0)
    .option('--tcti-port <port>', '', int)
    .option('--misbehave <how>')
    .option('--resume', 'continue a suspended guest (new ring, same request ids)')
    .option('--workload <file>', 'run a vtpm stress workload')
    .option('--no-startup', 'no Startup(CLEAR) at boot')
    .option('--xs-socket <path>', 'this domain\'s xenstore socket')
    .action(async (o: GuestRunOptions) => {
      await guestRun(o);
    });
  registerSuspend(guest);
}
