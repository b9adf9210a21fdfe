// Xenbus: the device handshake over XenStore (docs/protocols/xenbus.md). Device directories, the `state` key
// (enum xenbus_state), waiting on the peer's state through a watch, and the vTPM connect, close and
// resume sequences as reusable steps for both ends. The toolstack part (libxl's device add) is
// writeDeviceDirectories.
import { randomUUID } from 'node:crypto';
import { XsError, type TxId, type XsClient, type XsWatch } from './client.js';

/** enum xenbus_state, written to `state` as a decimal string. */
export enum XenbusState {
  Unknown = 0,
  Initialising = 1,
  InitWait = 2,
  Initialised = 3,
  Connected = 4,
  Closing = 5,
  Closed = 6,
  Reconfiguring = 7,
  Reconfigured = 8,
}

export type XenbusErrorCode = 'XENBUS_TIMEOUT' | 'XENBUS_PROTOCOL' | 'XENBUS_CLOSED';

/** A handshake failure: a peer that never reached a state, broke the protocol, or went away. */
export class XenbusError extends Error {
  constructor(
    readonly code: XenbusErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'XenbusError';
  }
}

/** Both directories of one vTPM device. */
export interface VtpmDevice {
  readonly frontDomid: number;
  readonly backDomid: number;
  readonly devid: number;
  /** /local/domain/<fe>/device/vtpm/<devid> */
  readonly frontend: string;
  /** /local/domain/<be>/backend/vtpm/<fe>/<devid> */
  readonly backend: string;
}

/** /local/domain/<frontDomid>/device/vtpm/<devid> */
export function frontendPath(frontDomid: number, devid: number): string {
  return `/local/domain/${frontDomid}/device/vtpm/${devid}`;
}

/** /local/domain/<backDomid>/backend/vtpm/<frontDomid>/<devid> */
export function backendPath(backDomid: number, frontDomid: number, devid: number): string {
  return `/local/domain/${backDomid}/backend/vtpm/${frontDomid}/${devid}`;
}

/** Both paths of a vTPM device (backend in dom0 unless given). */
export function vtpmDevice(frontDomid: number, devid: number, backDomid = 0): VtpmDevice {
  return {
    frontDomid,
    backDomid,
    devid,
    frontend: frontendPath(frontDomid, devid),
    backend: backendPath(backDomid, frontDomid, devid),
  };
}

/** Parse a `state` value; anything missing or malformed is Unknown, as Linux's xenbus_read_driver_state. */
export function parseState(v: string | undefined): XenbusState {
  if (v === undefined || !/^[0-8]$/.test(v)) return XenbusState.Unknown;
  return Number(v) as XenbusState;
}

/** Read `<dir>/state` (Unknown if absent). */
export async function readState(client: XsClient, dir: string, tx: TxId = 0): Promise<XenbusState> {
  return parseState(await client.tryRead(`${dir}/state`, tx));
}

/** Write `<dir>/state`. */
export async function switchState(client: XsClient, dir: string, state: XenbusState, tx: TxId = 0): Promise<void> {
  await client.write(`${dir}/state`, String(state), tx);
}

/** Call `onState` with `<dir>/state` now and after every change (duplicates dropped); close the watch to stop. */
export async function watchState(client: XsClient, dir: string, onState: (s: XenbusState) => void): Promise<XsWatch> {
  let last: XenbusState | undefined;
  let chain = Promise.resolve();
  return client.watch(`${dir}/state`, () => {
    // reads are chained so callbacks see states in the order the events came
    chain = chain.then(async () => {
      let s: XenbusState;
      try {
        s = await readState(client, dir);
      } catch {
        return; // connection gone or access lost: the watch ends by itself
      }
      if (s !== last) {
        last = s;
        onState(s);
      }
    });
  });
}

export interface WaitOptions {
  /** Give up after this long (XenbusError XENBUS_TIMEOUT); default: wait forever. */
  timeoutMs?: number;
  /** Stop waiting (the promise rejects with the signal's reason) and drop the watch. */
  signal?: AbortSignal;
}

/**
 * Resolve with `<dir>/state` once `predicate` holds (checked now and on every change, via a watch).
 * The WATCH and the first read leave together, in that order, so a state that already holds costs one
 * round trip; the watch's registration event is then no news (the read behind it answers for it) and
 * is not followed by a read of its own. The UNWATCH is sent without waiting for its reply (requests on
 * one connection stay ordered).
 */
export async function waitForState(
  client: XsClient,
  dir: string,
  predicate: (s: XenbusState) => boolean,
  opts: WaitOptions = {},
): Promise<XenbusState> {
  let timer: NodeJS.Timeout | undefined;
  let registering: Promise<XsWatch> | undefined;
  try {
    return await new Promise<XenbusState>((resolve, reject) => {
      if (opts.timeoutMs !== undefined) {
        timer = setTimeout(
          () => reject(new XenbusError('XENBUS_TIMEOUT', `${dir}/state did not reach the awaited state in ${opts.timeoutMs} ms`)),
          opts.timeoutMs,
        );
      }
      if (opts.signal) {
        if (opts.signal.aborted) return reject(opts.signal.reason);
        opts.signal.addEventListener('abort', () => reject(opts.signal!.reason), { once: true });
      }
      const check = (): void => {
        readState(client, dir).then((s) => {
          if (predicate(s)) resolve(s);
        }, () => {});
      };
      // xenstored sends the registration event right after the WATCH's reply, before it handles the
      // READ behind it: the first event is always that one. Every later event is a change.
      let registered = false;
      registering = client.watch(`${dir}/state`, () => {
        if (!registered) registered = true;
        else check();
      });
      registering.catch(reject);
      check();
    });
  } finally {
    if (timer) clearTimeout(timer);
    registering?.then((w) => w.close()).catch(() => {});
  }
}

export interface DeviceDirectoryOptions {
  frontDomid: number;
  backDomid: number;
  devid: number;
  /** vTPM UUID written to the backend's `uuid` (random if absent, as libxl does). */
  uuid?: string;
  /** Additional keys for each side, e.g. {backend: {'pref_instance': '3'}}. */
  extra?: { frontend?: Record<string, string>; backend?: Record<string, string> };
}

/**
 * What libxl does to add a vTPM (docs/protocols/xenbus.md, Directories), in one transaction: the backend directory
 * [n<be>, r<fe>] with frontend, frontend-id, online=1, state=1, handle, uuid, resume=False; the
 * frontend directory [n<fe>, r<be>] with backend, backend-id, state=1, handle; and libxl's own copy
 * under /libxl/<fe>/device/vtpm/<devid>. Old contents of those directories are removed first.
 */
export async function writeDeviceDirectories(client: XsClient, o: DeviceDirectoryOptions): Promise<VtpmDevice> {
  const dev = vtpmDevice(o.frontDomid, o.devid, o.backDomid);
  const uuid = o.uuid ?? randomUUID();
  const libxl = `/libxl/${o.frontDomid}/device/vtpm/${o.devid}`;
  const back: Record<string, string> = {
    frontend: dev.frontend,
    'frontend-id': String(o.frontDomid),
    online: '1',
    state: String(XenbusState.Initialising),
    handle: String(o.devid),
    uuid,
    resume: 'False',
    ...o.extra?.backend,
  };
  const front: Record<string, string> = {
    backend: dev.backend,
    'backend-id': String(o.backDomid),
    state: String(XenbusState.Initialising),
    handle: String(o.devid),
    ...o.extra?.frontend,
  };
  await client.transaction(async (tx) => {
    for (const p of [dev.frontend, dev.backend, libxl]) await client.rm(p, tx).catch(ignoreEnoent);
    await client.mkdir(dev.frontend, tx);
    await client.setPerms(dev.frontend, [{ domid: o.frontDomid, access: 'n' }, { domid: o.backDomid, access: 'r' }], tx);
    await client.mkdir(dev.backend, tx);
    await client.setPerms(dev.backend, [{ domid: o.backDomid, access: 'n' }, { domid: o.frontDomid, access: 'r' }], tx);
    // keys created inside the directories inherit their permissions
    for (const [k, v] of Object.entries(front)) await client.write(`${dev.frontend}/${k}`, v, tx);
    for (const [k, v] of Object.entries(back)) await client.write(`${dev.backend}/${k}`, v, tx);
    await client.write(`${libxl}/frontend`, dev.frontend, tx);
    await client.write(`${libxl}/backend`, dev.backend, tx);
  });
  return dev;
}

/** Remove a device's directories (what the toolstack does after the device closed). */
export async function removeDeviceDirectories(client: XsClient, dev: VtpmDevice): Promise<void> {
  await client.transaction(async (tx) => {
    for (const p of [dev.frontend, dev.backend, `/libxl/${dev.frontDomid}/device/vtpm/${dev.devid}`]) {
      await client.rm(p, tx).catch(ignoreEnoent);
    }
  });
}

function ignoreEnoent(err: unknown): void {
  if (!(err instanceof XsError && err.code === 'ENOENT')) throw err;
}

/** Linux's xenbus_dev_fatal: write `<home>/error/<dir below home>/error` = "<errno> <message>", then Closing. */
export async function deviceFatal(client: XsClient, dir: string, errno: number, message: string): Promise<void> {
  const m = /^(\/local\/domain\/[0-9]+)\/(.+)$/.exec(dir);
  if (m) await client.write(`${m[1]}/error/${m[2]}/error`, `${errno} ${message}`).catch(() => {});
  await switchState(client, dir, XenbusState.Closing);
}

// ---- frontend ---------------------------------------------------------------------------------------

/** What a vTPM frontend publishes: its ring's grant ref and its event channel port. */
export interface FrontendRing {
  ringRef: number;
  eventChannel: number;
  /** Additional keys (e.g. a ring protocol feature); `feature-protocol-v2` = "1" is always written. */
  extra?: Record<string, string>;
}

export interface ConnectOptions extends WaitOptions {
  /** Backend key that must be non-zero before the frontend connects (default feature-protocol-v2). */
  requireBackendFeature?: string;
  /**
   * A transaction the caller started already (sent along with its earlier requests), used for the
   * first attempt: the publish then costs one round trip instead of three.
   */
  tx?: Promise<TxId>;
}

/**
 * Frontend connect (docs/protocols/xenbus.md, Connect steps 3 and 5): publish ring-ref, event-channel and
 * feature-protocol-v2 and switch to Initialised in one transaction; wait for the backend to be
 * Initialised or Connected; require its protocol feature (else fatal → Closing); switch to Connected.
 *
 * The transaction matters: a backend that took the device over from a dead one still sees our old
 * Connected and old ring until we publish a new one, and must never see the new keys with the old
 * state (it would map a ring we are still setting up). Its writes, its commit and the first read of
 * the backend's state leave together: xenstored handles a connection's requests in order, so the read
 * sees the committed transaction. A commit that conflicts (EAGAIN) is redone in a new transaction.
 */
export async function frontendConnect(client: XsClient, dev: VtpmDevice, ring: FrontendRing, opts: ConnectOptions = {}): Promise<void> {
  const feature = opts.requireBackendFeature ?? 'feature-protocol-v2';
  let started: Promise<TxId> | undefined = opts.tx;
  let waiting: Promise<[XenbusState, string | undefined]> | undefined;
  for (let attempt = 1; ; attempt++) {
    const tx = await (started ?? client.transactionStart());
    started = undefined;
    const writes = Promise.all([
      client.write(`${dev.frontend}/ring-ref`, String(ring.ringRef), tx),
      client.write(`${dev.frontend}/event-channel`, String(ring.eventChannel), tx),
      client.write(`${dev.frontend}/feature-protocol-v2`, '1', tx),
      ...Object.entries(ring.extra ?? {}).map(([k, v]) => client.write(`${dev.frontend}/${k}`, v, tx)),
      switchState(client, dev.frontend, XenbusState.Initialised, tx),
    ]);
    const commit = client.transactionEnd(tx, true);
    // The backend published its features before InitWait: read them while waiting for its state.
    waiting ??= Promise.all([
      waitForState(
        client,
        dev.backend,
        (st) => st === XenbusState.Initialised || st === XenbusState.Connected || st === XenbusState.Closing || st === XenbusState.Closed,
        opts,
      ),
      client.tryRead(`${dev.backend}/${feature}`),
    ]);
    waiting.catch(() => {});
    const [w, c] = await Promise.allSettled([writes, commit]);
    if (c.status === 'fulfilled') {
      // A write refused inside a committed transaction leaves the device half published: fatal.
      if (w.status === 'rejected') throw w.reason;
      break;
    }
    if (!(c.reason instanceof XsError && c.reason.code === 'EAGAIN') || attempt >= 100) throw c.reason;
    if (attempt >= 3) await new Promise((r) => setTimeout(r, Math.random() * Math.min(attempt, 20)));
  }
  await finishConnect(client, dev, feature, waiting);
}

/** Steps 7 of a connect once the backend answered the published ring: check its feature, go Connected. */
async function finishConnect(
  client: XsClient,
  dev: VtpmDevice,
  feature: string,
  waiting: Promise<[XenbusState, string | undefined]>,
): Promise<void> {
  const [s, early] = await waiting;
  if (s === XenbusState.Closing || s === XenbusState.Closed) throw new XenbusError('XENBUS_CLOSED', `backend ${dev.backend} went to state ${XenbusState[s]}`);
  // Read before a backend that was not up yet had published it: read it again now.
  const v = early === '1' ? early : await client.tryRead(`${dev.backend}/${feature}`);
  if (!v || !/^[0-9]+$/.test(v) || Number(v) === 0) {
    await deviceFatal(client, dev.frontend, 22, 'vTPM protocol 2 required');
    throw new XenbusError('XENBUS_PROTOCOL', `backend ${dev.backend} lacks ${feature}`);
  }
  // The ring is live once the backend is Connected: ours is news for the backend, not a step it waits
  // for, so the caller need not wait for the reply (requests later on this connection follow it).
  void switchState(client, dev.frontend, XenbusState.Connected).catch(() => {});
}

/**
 * Frontend resume after a close the backend acknowledged (docs/protocols/xenbus.md, resume), in one batch: Initialising,
 * the new ring's keys, Initialised, and behind them the wait for the backend. As Linux's
 * tpmfront_resume, it does not wait for the backend's InitWait first: a backend still tearing the old
 * ring down sees the new one after it (its steps run in order), and one that reads Initialised with a
 * ring other than the one it serves closes that one first. No transaction is needed: our state says
 * Initialising while the keys change, and xenstored applies one connection's requests in order, so
 * whoever reads Initialised reads the new keys. The backend is Closing (its acknowledgement of our
 * close) or InitWait when this starts, so a Closing seen before anything else is that old answer.
 */
export async function frontendReconnect(client: XsClient, dev: VtpmDevice, ring: FrontendRing, opts: ConnectOptions = {}): Promise<void> {
  const feature = opts.requireBackendFeature ?? 'feature-protocol-v2';
  const writes = Promise.all([
    switchState(client, dev.frontend, XenbusState.Initialising),
    client.write(`${dev.frontend}/ring-ref`, String(ring.ringRef)),
    client.write(`${dev.frontend}/event-channel`, String(ring.eventChannel)),
    client.write(`${dev.frontend}/feature-protocol-v2`, '1'),
    ...Object.entries(ring.extra ?? {}).map(([k, v]) => client.write(`${dev.frontend}/${k}`, v)),
    switchState(client, dev.frontend, XenbusState.Initialised),
  ]);
  let fresh = false;
  const waiting = Promise.all([
    waitForState(
      client,
      dev.backend,
      (st) => {
        if (st === XenbusState.Closing && !fresh) return false;
        fresh = true;
        return st === XenbusState.Initialised || st === XenbusState.Connected || st === XenbusState.Closing || st === XenbusState.Closed;
      },
      opts,
    ),
    client.tryRead(`${dev.backend}/${feature}`),
  ]);
  waiting.catch(() => {});
  await writes;
  await finishConnect(client, dev, feature, waiting);
}

/**
 * Frontend close (docs/protocols/xenbus.md, Close): Closing, wait (up to timeoutMs, default 5 s as Linux) for the backend
 * to leave Connected for Closing/Closed/InitWait, then Closed. Resolves even if the backend is silent:
 * with whether it answered.
 */
export async function frontendClose(client: XsClient, dev: VtpmDevice, opts: WaitOptions & { closing?: boolean } = {}): Promise<boolean> {
  // `closing`: our state is Closing already. The wait's first read goes out right behind the write.
  const announced = opts.closing ? Promise.resolve() : switchState(client, dev.frontend, XenbusState.Closing);
  let answered = false;
  try {
    await Promise.all([
      announced,
      waitForState(
        client,
        dev.backend,
        (s) => s === XenbusState.Closing || s === XenbusState.Closed || s === XenbusState.InitWait || s === XenbusState.Unknown,
        { timeoutMs: opts.timeoutMs ?? 5000 },
      ),
    ]);
    answered = true;
  } catch (err) {
    if (!(err instanceof XenbusError && err.code === 'XENBUS_TIMEOUT')) throw err;
  }
  await switchState(client, dev.frontend, XenbusState.Closed);
  return answered;
}

/**
 * Frontend resume (docs/protocols/xenbus.md, resume): grant refs and ports of the old ring are dead, so go back to
 * Initialising and redo the whole connect with the new ring and event channel.
 */
export async function frontendResume(client: XsClient, dev: VtpmDevice, ring: FrontendRing, opts: ConnectOptions = {}): Promise<void> {
  await switchState(client, dev.frontend, XenbusState.Initialising);
  await frontendConnect(client, dev, ring, opts);
}

// ---- backend ----------------------------------------------------------------------------------------

/** What the backend reads from the frontend directory before mapping the ring. */
export interface FrontendInfo {
  ringRef: number;
  eventChannel: number;
  /** feature-protocol-v2 = "1" was published. */
  protocolV2: boolean;
  /** The state the frontend was in when read (Initialised or Connected). */
  state: XenbusState;
}

/** Backend step 2: publish features (default feature-protocol-v2 = "1"), then switch to InitWait (pipelined, state last). */
export async function backendInitWait(
  client: XsClient,
  dev: VtpmDevice,
  features: Record<string, string> = { 'feature-protocol-v2': '1' },
): Promise<void> {
  await Promise.all([
    ...Object.entries(features).map(([k, v]) => client.write(`${dev.backend}/${k}`, v)),
    switchState(client, dev.backend, XenbusState.InitWait),
  ]);
}

/**
 * Backend step 5 (first half): wait for the frontend to be Initialised or Connected, then read its
 * ring-ref, event-channel and feature-protocol-v2 (XENBUS_PROTOCOL if missing or malformed).
 */
export async function backendAwaitFrontend(client: XsClient, dev: VtpmDevice, opts: WaitOptions = {}): Promise<FrontendInfo> {
  const state = await waitForState(client, dev.frontend, (s) => s === XenbusState.Initialised || s === XenbusState.Connected, opts);
  return readFrontendRing(client, dev, state);
}

/** Read what a frontend seen Initialised or Connected (`state`) published (XENBUS_PROTOCOL if missing or malformed). */
export async function readFrontendRing(client: XsClient, dev: VtpmDevice, state: XenbusState): Promise<FrontendInfo> {
  const [ring, port, v2] = await Promise.all([
    client.tryRead(`${dev.frontend}/ring-ref`),
    client.tryRead(`${dev.frontend}/event-channel`),
    client.tryRead(`${dev.frontend}/feature-protocol-v2`),
  ]);
  return parseFrontendRing(dev, state, ring, port, v2);
}

/** Check the ring-ref, event-channel and feature-protocol-v2 values a frontend published (XENBUS_PROTOCOL if bad). */
export function parseFrontendRing(
  dev: VtpmDevice,
  state: XenbusState,
  ring: string | undefined,
  port: string | undefined,
  v2: string | undefined,
): FrontendInfo {
  const u32 = (s: string | undefined): number | undefined =>
    s !== undefined && /^[0-9]{1,10}$/.test(s) && Number(s) <= 0xffffffff ? Number(s) : undefined;
  const ringRef = u32(ring);
  const eventChannel = u32(port);
  if (ringRef === undefined || eventChannel === undefined) {
    throw new XenbusError('XENBUS_PROTOCOL', `frontend ${dev.frontend} published ring-ref "${ring}" event-channel "${port}"`);
  }
  return { ringRef, eventChannel, protocolV2: v2 === '1', state };
}

/** Backend step 5 (second half) and 6: write ready = "1", then switch to Connected (pipelined, state last). */
export async function backendConnected(client: XsClient, dev: VtpmDevice): Promise<void> {
  await Promise.all([client.write(`${dev.backend}/ready`, '1'), switchState(client, dev.backend, XenbusState.Connected)]);
}

/**
 * The whole backend connect: InitWait, wait for the frontend, `attach` (map the grant, bind the
 * event channel; throwing makes the device fatal), Connected. Returns what the frontend published.
 */
export async function backendConnect(
  client: XsClient,
  dev: VtpmDevice,
  attach: (fe: FrontendInfo) => Promise<void>,
  opts: WaitOptions & { requireProtocolV2?: boolean } = {},
): Promise<FrontendInfo> {
  await backendInitWait(client, dev);
  const fe = await backendAwaitFrontend(client, dev, opts);
  if ((opts.requireProtocolV2 ?? true) && !fe.protocolV2) {
    await deviceFatal(client, dev.backend, 22, 'frontend did not publish feature-protocol-v2');
    throw new XenbusError('XENBUS_PROTOCOL', `frontend ${dev.frontend} lacks feature-protocol-v2`);
  }
  try {
    await attach(fe);
  } catch (err) {
    await deviceFatal(client, dev.backend, 5, `attach failed: ${err instanceof Error ? err.message : String(err)}`);
    throw err;
  }
  await backendConnected(client, dev);
  return fe;
}

/**
 * Backend close (docs/protocols/xenbus.md; mini-os): on frontend Closing, go Closing; once the frontend is Closed
 * (or gone), `detach` (unmap, unbind), clear `ready`, and return to InitWait for a new connection —
 * or to Closed when the frontend directory disappeared. Returns the backend's final state.
 */
export async function backendClose(
  client: XsClient,
  dev: VtpmDevice,
  detach: () => Promise<void>,
  opts: WaitOptions = {},
): Promise<XenbusState> {
  await switchState(client, dev.backend, XenbusState.Closing);
  const fe = await waitForState(client, dev.frontend, (s) => s === XenbusState.Closed || s === XenbusState.Unknown, opts);
  await detach();
  await client.rm(`${dev.backend}/ready`).catch(ignoreEnoent);
  const next = fe === XenbusState.Unknown ? XenbusState.Closed : XenbusState.InitWait;
  await switchState(client, dev.backend, next);
  return next;
}

/**
 * Backend side of a frontend resume: the frontend went back to Initialising (its old ring is dead),
 * so `detach`, return to InitWait and run the connect again with the new ring.
 */
export async function backendResume(
  client: XsClient,
  dev: VtpmDevice,
  detach: () => Promise<void>,
  attach: (fe: FrontendInfo) => Promise<void>,
  opts: WaitOptions & { requireProtocolV2?: boolean } = {},
): Promise<FrontendInfo> {
  await detach();
  await client.rm(`${dev.backend}/ready`).catch(ignoreEnoent);
  return backendConnect(client, dev, attach, opts);
}
