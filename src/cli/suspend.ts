// `vtpm guest suspend|resume` and the guest process behind them (both transports). Suspend goes through
// xenstore as xl does: the toolstack (or the guest itself) writes "suspend" to
// /local/domain/N/control/shutdown; the guest process stops issuing commands, closes its device (the
// backend answers what it accepted, bounded, and saves the vTPM at the manager), saves its state in
// RUN/guests/domN.json (ring: its next request id and anything unanswered), and exits. Resume starts a
// new guest process that builds a new page or ring, grants and event channel (ring: continuing the
// id sequence). See docs/suspend-and-stress.md and docs/protocols/xenbus.md.
import type { Command } from 'commander';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Domain } from '../xen/index.js';
import { connect, type XsClient } from '../xenstore/client.js';
import { vtpmDevice } from '../xenstore/xenbus.js';
import { GuestSession } from '../frontend/session.js';
import { V2Session } from '../frontend/v2-session.js';
import { autoStartup } from '../frontend/startup.js';
import type { Protocol } from '../frontend/tpmfront.js';
import { RunDir, alive, procStat, type GuestInfo } from './rundir.js';
import { guestOwner, guestSocket, spawnGuestProcess, tailFile } from './spawn.js';
import { onStop } from './lifecycle.js';

export const controlShutdown = (domid: number): string => `/local/domain/${domid}/control/shutdown`;

export interface SuspendResult {
  /** From writing control/shutdown to the guest process having exited with its state saved. */
  ms: number;
  /** Ring protocol only: the id the resumed guest continues with (v2 requests carry no ids). */
  nextId?: string;
  inflight: number;
}

/** Ask the guest to suspend (as `xl save` does) and wait until it has. */
export async function guestSuspend(run: string, domid: number, timeoutMs = 120_000): Promise<SuspendResult> {
  const rd = new RunDir(run);
  const h = rd.readHost();
  const g = rd.readGuest(domid);
  if (!g) throw new Error(`dom${domid} is not attached`);
  if (g.suspended) throw new Error(`dom${domid} is already suspended`);
  if (!alive(g.pid, g.start)) throw new Error(`dom${domid}'s guest process (pid ${g.pid}) is not running`);
  const xs = await connect(h.xenstoredSocket);
  const t0 = performance.now();
  try {
    await writeControl(xs, domid, 'suspend');
    const deadline = Date.now() + timeoutMs;
    while (alive(g.pid, g.start)) {
      if (Date.now() > deadline) throw new Error(`dom${domid} did not suspend within ${timeoutMs} ms:\n${tailFile(rd.log(`guest-${domid}`))}`);
      await sleep(2);
    }
  } finally {
    await xs.close();
  }
  const after = rd.readGuest(domid);
  if (!after?.suspended) throw new Error(`dom${domid} exited without saving its suspend state:\n${tailFile(rd.log(`guest-${domid}`))}`);
  return { ms: performance.now() - t0, ...(after.nextId !== undefined ? { nextId: after.nextId } : {}), inflight: after.inflight?.length ?? 0 };
}

/** The toolstack's write of control/shutdown, readable and writable by the guest (as libxl sets it). */
async function writeControl(xs: XsClient, domid: number, value: string): Promise<void> {
  await xs.transaction(async (tx) => {
    await xs.write(controlShutdown(domid), value, tx);
    await xs.setPerms(controlShutdown(domid), [{ domid, access: 'n' }], tx);
  });
}

export interface ResumeOptions {
  run: string;
  domid: number;
  timeoutMs?: number;
}

/** Start a new guest process for a suspended guest (or one whose process died); resolves once Connected. */
export async function guestResume(o: ResumeOptions): Promise<{ pid: number; ms: number }> {
  const rd = new RunDir(o.run);
  const h = rd.readHost();
  const g = rd.readGuest(o.domid);
  if (!g) throw new Error(`dom${o.domid} is not attached`);
  if (alive(g.pid, g.start)) throw new Error(`dom${o.domid} is running (pid ${g.pid}); suspend it first`);
  const t0 = performance.now();
  const dev = vtpmDevice(o.domid, g.devid, 0);
  const xs = await connect(h.xenstoredSocket);
  try {
    // As libxl on restore: the backend keeps the vTPM's saved volatile state (resume = True).
    await xs.write(`${dev.backend}/resume`, 'True');
    // Not resumed until the new process says so (a killed guest's file still says suspended: false).
    rd.writeGuest({ ...g, suspended: true }, guestOwner(h, o.domid));
    const log = rd.log(`guest-${o.domid}`);
    const args = ['guest', 'run', '--run', rd.dir, '--domid', String(o.domid), '--protocol', g.protocol, '--devid', String(g.devid), '--resume', '--xs-socket', guestSocket(h, o.domid)];
    if (g.tctiPort !== undefined) args.push('--tcti-port', String(g.tctiPort));
    if (g.workload !== undefined) args.push('--workload', g.workload);
    const child = await spawnGuestProcess(h, o.domid, args, log);
    const pid = child.pid ?? -1;
    const exited = new Promise<never>((_, reject) =>
      child.once('exit', (code, sig) => reject(new Error(`guest dom${o.domid} exited (${sig ?? code}) before resuming:\n${tailFile(log)}`))),
    );
    exited.catch(() => {});
    // Connected with a ring built by this process (the old process's Connected does not count).
    await Promise.race([
      (async () => {
        const deadline = Date.now() + (o.timeoutMs ?? 60_000);
        for (;;) {
          const now = rd.readGuest(o.domid);
          if (now?.pid === pid && now.suspended === false) break;
          if (Date.now() > deadline) throw new Error(`dom${o.domid} did not resume within ${o.timeoutMs ?? 60_000} ms:\n${tailFile(log)}`);
          await sleep(2);
        }
      })(),
      exited,
    ]);
    return { pid, ms: performance.now() - t0 };
  } finally {
    await xs.close();
  }
}

/** Saved resume state of a guest, as the guest process reads it. */
function resumeState(g: GuestInfo | null): { firstId: bigint; inflight: { id: bigint; command: Uint8Array; locality: number }[] } {
  // A guest process that was killed never saved its last id; ids must never be reused (the backend
  // would answer a reused id from its table), so a resumed sequence also starts above the clock:
  // milliseconds × 2^20 stays monotonic across restarts and inside u64 for centuries.
  const saved = BigInt(g?.nextId ?? '1');
  const floor = BigInt(Date.now()) << 20n;
  return {
    firstId: saved > floor ? saved : floor,
    inflight: (g?.inflight ?? []).map((r) => ({ id: BigInt(r.id), command: Buffer.from(r.command, 'hex'), locality: r.locality })),
  };
}

/** The guest process (either transport): device session, suspend watch, optional TCTI bridge or stress workload. */
export async function runSession(
  rd: RunDir,
  dom: Domain,
  xs: XsClient,
  o: { domid: number; devid: number; protocol: Protocol; tctiPort?: number; resume?: boolean; workload?: string; startup?: boolean },
): Promise<void> {
  if (o.workload !== undefined && o.protocol !== 'ring') throw new Error('a stress workload needs --protocol ring (its journal resubmits by request id)');
  const g = rd.readGuest(o.domid);
  const saved = o.resume && o.protocol === 'ring' ? resumeState(g) : { firstId: 1n, inflight: [] };
  let exiting = false;
  let session: GuestSession | V2Session | undefined;
  let bridge: { stop(): Promise<void> } | undefined;
  let workload: { stop(opts?: { suspended?: boolean }): Promise<void> } | undefined;
  const exit = async (code: number): Promise<never> => {
    exiting = true;
    await xs.close().catch(() => {});
    await dom.destroy().catch(() => {});
    process.exit(code);
  };
  onStop(async () => {
    if (exiting) return;
    exiting = true;
    await workload?.stop().catch(() => {});
    await bridge?.stop().catch(() => {});
    await session?.close().catch(() => {});
    await xs.close().catch(() => {});
    await dom.destroy().catch(() => {});
  });
  if (o.resume) {
    // A new kernel instance: the suspend request it resumed from is done.
    await xs.write(controlShutdown(o.domid), '').catch(() => {});
  }
  const common = {
    xs,
    dom,
    devid: o.devid,
    reconnect: o.resume ?? false,
    log: (l: string) => console.log(l),
    onClosed: (reason: string) => {
      console.log(`dom${o.domid}: device closed: ${reason}`);
      void exit(0);
    },
  };
  session = o.protocol === 'ring' ? await GuestSession.open({ ...common, firstId: saved.firstId }) : await V2Session.open(common);
  const s = session;
  const ids = s instanceof GuestSession ? `, next id ${s.nextId}` : '';
  console.log(`dom${o.domid}: vTPM connected (${o.protocol}, ring-ref ${s.front?.refs[0]}, event-channel ${s.front?.port}${ids})`);
  // At boot (never on resume) the guest's TPM driver starts a TPM that was never started, as Linux's does.
  if (!o.resume && o.startup !== false) {
    const r = await autoStartup((cmd) => s.submit(cmd));
    console.log(`dom${o.domid}: TPM ${r.version} ${r.outcome === 'started' ? 'started (Startup CLEAR)' : r.outcome === 'running' ? 'already started' : `Startup failed (0x${r.rc.toString(16)})`}`);
  }
  // What the previous instance left unanswered runs now (or is answered from the backend's table).
  if (s instanceof GuestSession) for (const r of saved.inflight) void s.resubmit(r).catch(() => {});
  if (o.tctiPort !== undefined) {
    const { startTcti } = await import('./guest.js');
    bridge = await startTcti({ transmit: (cmd, opts) => s.submit(cmd, opts), cancel: () => s.front?.cancel() }, o.tctiPort);
  }
  if (o.workload !== undefined && s instanceof GuestSession) {
    const { startWorkload } = await import('./stress-workload.js');
    workload = startWorkload(s, o.workload, o.domid, (l) => console.log(l));
  }
  // Resumed once the bridge serves (`guest resume` returns on this, and tpm2-tools may follow at once).
  if (g) {
    rd.writeGuest({
      ...g,
      pid: process.pid,
      start: procStat(process.pid)?.start,
      suspended: false,
      ...(s instanceof GuestSession ? { nextId: String(s.nextId), inflight: [] } : {}),
    });
  }
  let suspending = false;
  await xs.watch(controlShutdown(o.domid), () => {
    void (async () => {
      if (suspending || exiting) return;
      const v = await xs.tryRead(controlShutdown(o.domid)).catch(() => undefined);
      if (v !== 'suspend') return;
      suspending = true;
      const t0 = performance.now();
      // Stop issuing; what is in flight is answered by the backend before it acknowledges.
      await bridge?.stop().catch(() => {});
      // The workload stops issuing; its command in flight is answered during the close (or resubmitted
      // by the next instance from its journal), so nothing waits for the workload itself.
      void workload?.stop({ suspended: true });
      const left = await s.suspend();
      const cur = rd.readGuest(o.domid) ?? g;
      if (cur) {
        rd.writeGuest({
          ...cur,
          suspended: true,
          ...(s instanceof GuestSession ? { nextId: String(s.nextId) } : {}),
          inflight: left.map((r) => ({ id: String(r.id), command: Buffer.from(r.command).toString('hex'), locality: r.locality })),
        });
      }
      console.log(`dom${o.domid}: suspended in ${(performance.now() - t0).toFixed(2)} ms (${s instanceof GuestSession ? `next id ${s.nextId}, ` : ''}${left.length} unanswered)`);
      await exit(0);
    })().catch((e: unknown) => {
      console.log(`dom${o.domid}: suspend failed: ${(e as Error).message}`);
      void exit(1);
    });
  });
  setInterval(() => {}, 1 << 30);
}

const int = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new Error(`not an integer: ${v}`);
  return n;
};

export function registerSuspend(guest: Command): void {
  guest
    .command('suspend')
    .description('suspend a guest through xenstore (control/shutdown = suspend); returns once its state is saved')
    .requiredOption('--run <dir>', 'run directory of the host')
    .requiredOption('--domid <n>', 'the guest domain id', int)
    .action(async (o: { run: string; domid: number }) => {
      const r = await guestSuspend(o.run, o.domid);
      const ids = r.nextId !== undefined ? `next request id ${r.nextId}, ` : '';
      console.log(`dom${o.domid} suspended in ${r.ms.toFixed(1)} ms (${ids}${r.inflight} unanswered)`);
    });
  guest
    .command('resume')
    .description('start a suspended guest again: new ring, grants and event channel; same vTPM state and request ids')
    .requiredOption('--run <dir>', 'run directory of the host')
    .requiredOption('--domid <n>', 'the guest domain id', int)
    .action(async (o: { run: string; domid: number }) => {
      const r = await guestResume(o);
      console.log(`dom${o.domid} resumed in ${r.ms.toFixed(1)} ms (pid ${r.pid})`);
    });
}
