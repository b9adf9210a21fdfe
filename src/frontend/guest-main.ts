// The guest process behind `vtpm guest run` (and a resume): its vTPM device over either transport, the
// suspend watch on control/shutdown, an optional TCTI bridge for tpm2-tools and an optional stress
// workload. A misbehaving guest drives its transport directly. What it keeps across suspend (next
// request id, unanswered requests) goes through the record the caller gives it (the run directory's
// guest file). See docs/suspend-and-stress.md and docs/protocols/xenbus.md.
import type { Domain } from '../xen/index.js';
import type { XsClient } from '../xenstore/client.js';
import { procStat } from '../util/proc.js';
import { misbehave, type Misbehaviour } from './hostile.js';
import { GuestSession } from './session.js';
import { autoStartup } from './startup.js';
import { TpmFront, type Protocol } from './tpmfront.js';
import { V2Session } from './v2-session.js';

/** xenstore key the toolstack writes "suspend" to (as xl does). */
export const controlShutdown = (domid: number): string => `/local/domain/${domid}/control/shutdown`;

/** What the guest process keeps about itself across suspend and resume. */
export interface GuestRecord {
  pid: number;
  start?: number;
  suspended?: boolean;
  /** The next ring request id (decimal u64): ids are never reused across suspend. */
  nextId?: string;
  /** Ring requests sent and not answered when the guest suspended: {id, command hex, locality}. */
  inflight?: { id: string; command: string; locality: number }[];
}

export interface GuestProcessOptions {
  domid: number;
  protocol: Protocol;
  devid: number;
  tctiPort?: number;
  misbehave?: Misbehaviour;
  resume?: boolean;
  workload?: string;
  /** false: do not send Startup(CLEAR) to a TPM that was never started (`--no-startup`). */
  startup?: boolean;
}

/** Decides whether a TCP peer of the TCTI bridge may connect (by its sockets' addresses). */
export type PeerCheck = (s: { localAddress?: string; localPort?: number; remoteAddress?: string; remotePort?: number }) => boolean;

/** What the process around the guest provides. */
export interface GuestEnv<G extends GuestRecord> {
  /** The guest's own record (null when it has none). */
  record: { read(): G | null; write(g: G): void };
  /** Register cleanup for SIGTERM/SIGINT. */
  onStop(fn: () => Promise<void>): void;
  /** Who may connect to the TCTI bridge. */
  allowPeer: PeerCheck;
  /** Starts a stress workload on a ring session. */
  startWorkload?: (s: GuestSession, spec: string, domid: number, log: (l: string) => void) => Promise<{ stop(opts?: { suspended?: boolean }): Promise<void> }>;
}

/** The guest process on its domain and xenstore connection: a device session, or a misbehaving transport. */
export async function runGuest<G extends GuestRecord>(dom: Domain, xs: XsClient, o: GuestProcessOptions, env: GuestEnv<G>): Promise<void> {
  // Both transports run through a session: suspend/resume, backend restarts (request ids on the ring).
  // A misbehaving guest drives its transport directly: it has no use for sessions.
  if (!o.misbehave) return runSession(dom, xs, o, env);
  let stopping = false;
  const shutdown = async (): Promise<void> => {
    if (stopping) return;
    stopping = true;
    await bridge?.stop().catch(() => {});
    await front?.close().catch(() => {});
    await xs.close().catch(() => {});
    await dom.destroy().catch(() => {});
  };
  let bridge: { stop(): Promise<void> } | undefined;
  let front: TpmFront | undefined;
  env.onStop(shutdown);
  front = await TpmFront.connect({
    xs,
    dom,
    devid: o.devid,
    protocol: o.protocol,
    onClosed: (reason) => {
      console.log(`dom${o.domid}: device closed: ${reason}`);
      void shutdown().then(() => process.exit(0));
    },
  });
  console.log(`dom${o.domid}: vTPM connected (${front.protocol}, ring-ref ${front.refs[0]}, event-channel ${front.port})`);
  if (o.tctiPort !== undefined) bridge = await startTcti(front, o.tctiPort, env.allowPeer);
  if (o.misbehave) {
    const what = o.misbehave;
    // After attach has seen Connected, so the violation hits a live device.
    setTimeout(() => {
      void misbehave(front!, dom, what).then(
        (line) => console.log(`dom${o.domid}: misbehaving (${what}): ${line}`),
        (err: unknown) => console.log(`dom${o.domid}: misbehaving (${what}) ended: ${(err as Error).message}`),
      );
    }, 200);
  }
  // Keep the process alive while the device is up (the event-channel sockets are unref'd).
  setInterval(() => {}, 1 << 30);
}

/** Expose the device to tpm2-tools through the swtpm TCTI protocol. */
export async function startTcti(
  front: Pick<TpmFront, 'transmit' | 'cancel'>,
  port: number,
  allowPeer: PeerCheck,
): Promise<{ stop(): Promise<void> }> {
  const { TctiBridge } = await import('./tcti-bridge.js');
  const b = await TctiBridge.start({
    host: '127.0.0.1',
    port,
    transmit: (cmd, opts) => front.transmit(cmd, opts),
    cancel: () => front.cancel(),
    allowPeer,
  });
  console.log(`tcti bridge listening on 127.0.0.1:${port} (control ${port + 1})`);
  return b;
}

/** Saved resume state of a guest, as the guest process reads it. */
function resumeState(g: GuestRecord | null): { firstId: bigint; inflight: { id: bigint; command: Uint8Array; locality: number }[] } {
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
async function runSession<G extends GuestRecord>(dom: Domain, xs: XsClient, o: GuestProcessOptions, env: GuestEnv<G>): Promise<void> {
  if (o.workload !== undefined && o.protocol !== 'ring') throw new Error('a stress workload needs --protocol ring (its journal resubmits by request id)');
  const g = env.record.read();
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
  env.onStop(async () => {
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
    bridge = await startTcti({ transmit: (cmd, opts) => s.submit(cmd, opts), cancel: () => s.front?.cancel() }, o.tctiPort, env.allowPeer);
  }
  if (o.workload !== undefined && s instanceof GuestSession) {
    if (!env.startWorkload) throw new Error('this guest process cannot run a stress workload');
    workload = await env.startWorkload(s, o.workload, o.domid, (l) => console.log(l));
  }
  // Resumed once the bridge serves (`guest resume` returns on this, and tpm2-tools may follow at once).
  if (g) {
    env.record.write({
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
      const cur = env.record.read() ?? g;
      if (cur) {
        env.record.write({
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
