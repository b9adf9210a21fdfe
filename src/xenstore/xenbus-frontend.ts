// Xenbus, frontend role: the vTPM frontend's connect, reconnect, close and resume steps
// (docs/protocols/xenbus.md).
import { XsError, type TxId, type XsClient, type XsWatch } from './client.js';
import { WAIT_STOPPED, XenbusError, XenbusState, deviceFatal, readState, switchState, waitForState, watchState, type VtpmDevice, type WaitOptions } from './xenbus.js';

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
  /**
   * Resume only: resolves when the backend signals on the new ring's event channel, which it does once
   * xenstored applied its Connected (only a backend that bound the new port can): taken as that state.
   */
  connected?: Promise<void>;
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
 * close), InitWait, or (answered on the ring) still Connected when this starts, so a Closing seen
 * before anything else, or a Connected at the first read, is that old connection's.
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
  let first = true;
  const stop = new AbortController();
  const featureRead = client.tryRead(`${dev.backend}/${feature}`);
  const watched = Promise.all([
    waitForState(
      client,
      dev.backend,
      (st) => {
        // The first read is answered before the backend can have seen this publish: a Connected
        // there is the old connection's (its Closing not applied yet), never the new one's.
        const stale = st === XenbusState.Closing || (first && st === XenbusState.Connected);
        first = false;
        if (stale && !fresh) return false;
        fresh = true;
        return st === XenbusState.Initialised || st === XenbusState.Connected || st === XenbusState.Closing || st === XenbusState.Closed;
      },
      { ...opts, signal: opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal },
    ),
    featureRead,
  ]);
  watched.catch(() => {});
  // The event saves the watch event and the read of the backend's state behind it.
  const waiting = opts.connected ? Promise.race([watched, Promise.all([opts.connected.then(() => XenbusState.Connected), featureRead])]) : watched;
  waiting.catch(() => {});
  try {
    await writes;
    await finishConnect(client, dev, feature, waiting);
  } finally {
    stop.abort(WAIT_STOPPED);
  }
}

/** How long a close waits for the answer to its suspend notice before it watches the backend's state too. */
export const NOTICE_GRACE_MS = 200;

/**
 * Frontend close (docs/protocols/xenbus.md, Close): Closing, wait (up to timeoutMs, default 5 s as Linux) for the backend
 * to leave Connected for Closing/Closed/InitWait, then Closed (and `release` right behind it). Resolves
 * even if the backend is silent: with whether it answered.
 */
export async function frontendClose(
  client: XsClient,
  dev: VtpmDevice,
  opts: WaitOptions & { closing?: boolean; answered?: Promise<boolean>; release?: () => Promise<void> } = {},
): Promise<boolean> {
  // `closing`: our state is Closing already. The wait's first read goes out right behind the write.
  const announced = opts.closing ? Promise.resolve() : switchState(client, dev.frontend, XenbusState.Closing);
  // `answered`: the backend's answer by another way (the ring's suspend notice answered OK). It stands
  // for the Closing it writes, so that read-back is not waited for; false leaves the wait to xenstore.
  // Its watch and read then start only if that answer says no, or has not come within
  // NOTICE_GRACE_MS (a backend that died: its successor's InitWait ends the wait).
  let stop: AbortController | undefined;
  let seen: Promise<XenbusState> | undefined;
  const watchBackend = (): Promise<XenbusState> => {
    stop ??= new AbortController();
    seen ??= waitForState(
      client,
      dev.backend,
      (s) => s === XenbusState.Closing || s === XenbusState.Closed || s === XenbusState.InitWait || s === XenbusState.Unknown,
      { timeoutMs: opts.timeoutMs ?? 5000, signal: stop.signal },
    );
    seen.catch(() => {});
    return seen;
  };
  let grace: NodeJS.Timeout | undefined;
  const viaNotice = opts.answered?.then((ok) => (ok ? undefined : watchBackend()));
  const viaXenstore = viaNotice ? new Promise<void>((r) => (grace = setTimeout(r, NOTICE_GRACE_MS))).then(watchBackend) : watchBackend();
  viaNotice?.catch(() => {});
  viaXenstore.catch(() => {});
  let answered = false;
  try {
    await Promise.all([announced, viaNotice ? Promise.race([viaNotice, viaXenstore]) : viaXenstore]);
    answered = true;
  } catch (err) {
    if (!(err instanceof XenbusError && err.code === 'XENBUS_TIMEOUT')) throw err;
  } finally {
    clearTimeout(grace);
    stop?.abort(WAIT_STOPPED);
  }
  const closed = switchState(client, dev.frontend, XenbusState.Closed);
  if (opts.release) {
    // `release`: the ring's teardown (synchronous hypercalls) runs once Closed has left, while
    // xenstored applies it, not after its answer.
    closed.catch(() => {});
    client.flush();
    await opts.release();
  }
  await closed;
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

/** How long an InitWait seen before any Connected may be the backend's state from before it connected. */
export const STALE_INITWAIT_MS = 1000;

/**
 * Follow the backend's state once connected: `onState` with every change (duplicates dropped), as
 * watchState. `signalled`: the connection went on at the backend's event on the new port, which the
 * backend sends once its Connected has left for xenstored, not once xenstored applied it, so a read on
 * our own connection may still answer the InitWait it wrote before. An InitWait before any Connected
 * is passed on only if it is still there after `staleMs` (a backend that died and was replaced).
 */
export async function followBackend(
  client: XsClient,
  dev: VtpmDevice,
  onState: (s: XenbusState) => void,
  opts: { signalled?: boolean; staleMs?: number } = {},
): Promise<XsWatch> {
  let connectedSeen = !opts.signalled;
  let confirm: NodeJS.Timeout | undefined;
  const watch: Promise<XsWatch> = watchState(client, dev.backend, (s) => {
    if (s !== XenbusState.InitWait || connectedSeen) {
      if (s === XenbusState.Connected) connectedSeen = true;
      clearTimeout(confirm);
      confirm = undefined;
      onState(s);
      return;
    }
    confirm ??= setTimeout(() => {
      void Promise.all([watch, readState(client, dev.backend)]).then(
        ([w, now]) => {
          if (w.active && !connectedSeen && now === XenbusState.InitWait) onState(now);
        },
        () => {},
      );
    }, opts.staleMs ?? STALE_INITWAIT_MS);
    confirm.unref();
  });
  return watch;
}
