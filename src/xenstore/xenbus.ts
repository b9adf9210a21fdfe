// Xenbus: the device handshake over XenStore (docs/protocols/xenbus.md). What every role shares: device
// paths, the `state` key (enum xenbus_state), waiting on the peer's state through a watch, and the
// fatal-error node. Each role's steps are in its own file: xenbus-toolstack.ts (libxl's device add),
// xenbus-frontend.ts, xenbus-backend.ts.
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

export type XenbusErrorCode = 'XENBUS_TIMEOUT' | 'XENBUS_PROTOCOL' | 'XENBUS_CLOSED' | 'XENBUS_STOPPED';

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

/**
 * The reason a wait nobody needs any more is stopped with (`controller.abort(WAIT_STOPPED)`): made once,
 * as abort() without a reason builds a DOMException and its stack trace every time, on every handshake.
 */
export const WAIT_STOPPED = new XenbusError('XENBUS_STOPPED', 'the wait was stopped by its caller');

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

export function ignoreEnoent(err: unknown): void {
  if (!(err instanceof XsError && err.code === 'ENOENT')) throw err;
}

/** Linux's xenbus_dev_fatal: write `<home>/error/<dir below home>/error` = "<errno> <message>", then Closing. */
export async function deviceFatal(client: XsClient, dir: string, errno: number, message: string): Promise<void> {
  const m = /^(\/local\/domain\/[0-9]+)\/(.+)$/.exec(dir);
  if (m) await client.write(`${m[1]}/error/${m[2]}/error`, `${errno} ${message}`).catch(() => {});
  await switchState(client, dir, XenbusState.Closing);
}
