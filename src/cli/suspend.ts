// `vtpm guest suspend|resume`, the toolstack side (the guest process is src/frontend/guest-main.ts). Suspend goes through
// xenstore as xl does: the toolstack (or the guest itself) writes "suspend" to
// /local/domain/N/control/shutdown; the guest process stops issuing commands, closes its device (the
// backend answers what it accepted, bounded, and saves the vTPM at the manager), saves its state in
// RUN/guests/domN.json (ring: its next request id and anything unanswered), and exits. Resume starts a
// new guest process that builds a new page or ring, grants and event channel (ring: continuing the
// id sequence). See docs/suspend-and-stress.md and docs/protocols/xenbus.md.
import type { Command } from 'commander';
import { setTimeout as sleep } from 'node:timers/promises';
import { XsError, connect, type XsClient } from '../xenstore/client.js';
import { XenbusState } from '../xenstore/xenbus.js';
import { deviceOf } from '../xenstore/xenbus-toolstack.js';
import { controlShutdown } from '../frontend/guest-main.js';
import { RunDir, alive } from './rundir.js';
import { guestOwner, guestSocket, spawnGuestProcess, tailFile } from './spawn.js';


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
    // The guest's Closed, its last xenstore step before it saves its record and exits, is watched for;
    // until it comes the process is looked at only now and then (a guest that died without closing).
    const state = `/local/domain/${domid}/device/vtpm/${g.devid}/state`;
    let closed = false;
    let wake = (): void => {};
    const watching = xs.watch(state, () => {
      void xs.tryRead(state).then((v) => {
        if (v !== String(XenbusState.Closed)) return;
        closed = true;
        wake();
      }, () => {});
    });
    // The WATCH and the transaction's start leave together.
    await Promise.all([watching, writeControl(xs, domid, 'suspend')]);
    const deadline = Date.now() + timeoutMs;
    while (alive(g.pid, g.start)) {
      if (Date.now() > deadline) throw new Error(`dom${domid} did not suspend within ${timeoutMs} ms:\n${tailFile(rd.log(`guest-${domid}`))}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, closed ? 1 : 50);
        wake = () => (clearTimeout(t), r());
      });
    }
  } finally {
    await xs.close();
  }
  const after = rd.readGuest(domid);
  if (!after?.suspended) throw new Error(`dom${domid} exited without saving its suspend state:\n${tailFile(rd.log(`guest-${domid}`))}`);
  return { ms: performance.now() - t0, ...(after.nextId !== undefined ? { nextId: after.nextId } : {}), inflight: after.inflight?.length ?? 0 };
}

/**
 * The toolstack's write of control/shutdown, readable and writable by the guest (as libxl sets it), in
 * one transaction so the guest's watch fires on the finished node. Two round trips: the start, then the
 * write, the permissions and the commit together (xenstored applies one connection's requests in order).
 */
export async function writeControl(xs: XsClient, domid: number, value: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    const tx = await xs.transactionStart();
    const steps = Promise.all([xs.write(controlShutdown(domid), value, tx), xs.setPerms(controlShutdown(domid), [{ domid, access: 'n' }], tx)]);
    const [w, c] = await Promise.allSettled([steps, xs.transactionEnd(tx, true)]);
    if (w.status === 'rejected') throw w.reason;
    if (c.status === 'fulfilled') return;
    if (!(c.reason instanceof XsError && c.reason.code === 'EAGAIN') || attempt >= 100) throw c.reason;
  }
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
  const xs = await connect(h.xenstoredSocket);
  try {
    const dev = await deviceOf(xs, o.domid, g.devid);
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
