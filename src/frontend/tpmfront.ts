// TpmFront: a guest's vTPM device. Builds the transport the backend and toolstack agreed on (the
// tpmif v2 page, or the multi-request ring when both sides advertise it), publishes it through the
// xenbus connect sequence, and offers transmit/cancel/close to applications and the TCTI bridge.
import type { Domain } from '../xen/index.js';
import type { XsClient } from '../xenstore/client.js';
import { readState, switchState, vtpmDevice, type VtpmDevice, waitForState, WAIT_STOPPED, XenbusState } from '../xenstore/xenbus.js';
import { followBackend, frontendClose, frontendConnect, frontendReconnect, type FrontendRing } from '../xenstore/xenbus-frontend.js';
import type { XsWatch } from '../xenstore/client.js';
import { XS_FEATURE_RING } from '../xen/tpmif.js';
import { V2Front } from './v2-front.js';
import { RingFront } from '../tpmif/ring-front.js';
import { FrontendError, type TpmTransport, type TransmitOptions } from '../tpmif/transport.js';
import { trace } from '../util/trace.js';

export type Protocol = 'v2' | 'ring';

export interface TpmFrontOptions {
  xs: XsClient;
  dom: Domain;
  devid?: number;
  protocol?: Protocol;
  /** Data pages per ring request (ring protocol only). */
  segments?: number;
  /** First ring request id (ring protocol only; a resumed guest continues its id sequence). */
  firstId?: bigint;
  /** A new ring for a device this domain had connected before (resume, backend restart). */
  reconnect?: boolean;
  timeoutMs?: number;
  /**
   * Busy-poll window for answers in µs (default VTPM_POLL_US or 50; 0 = always sleep): the v2
   * channel's spin and the guest domain's busy mode (EventChannels.busyPollUs) alike.
   */
  pollUs?: number;
  /** When the frontend's poll stands down (default: CPU pressure, src/xen/poll.ts). */
  pollContended?: () => boolean;
  /** v2 only: bound on one command before it is cancelled (V2Front's default otherwise). */
  commandTimeoutMs?: number;
  /** Called once when the backend goes away or closes the device under us. */
  onClosed?: (reason: string) => void;
  /**
   * Called when the backend falls back to InitWait while we are connected: a restarted backend took
   * the device over and our ring and event channel are dead. Without it the device just closes.
   */
  onBackendReset?: () => void;
}

/**
 * Per xenstore connection and frontend home: the device as last connected, and whether its last close
 * was answered by the backend (then a resume need not wait for the backend's InitWait).
 */
const lastBackend = new WeakMap<XsClient, Map<string, { dev: VtpmDevice; answeredClose: boolean }>>();

function remember(xs: XsClient, home: string, dev: VtpmDevice): void {
  let map = lastBackend.get(xs);
  if (!map) lastBackend.set(xs, (map = new Map()));
  map.set(home, { dev, answeredClose: false });
}

export class TpmFront {
  readonly dev: VtpmDevice;
  readonly protocol: Protocol;
  readonly #xs: XsClient;
  readonly #transport: TpmTransport;
  #backendWatch: Promise<XsWatch> | null = null;
  #closed = false;
  #closing: Promise<void> | null = null;
  /** We wrote Connected and nothing since. */
  #connected = true;

  private constructor(xs: XsClient, dev: VtpmDevice, transport: TpmTransport) {
    this.#xs = xs;
    this.dev = dev;
    this.#transport = transport;
    this.protocol = transport.protocol;
  }

  /** Run the frontend side of the connect sequence; resolves once the device is Connected. */
  static async connect(opts: TpmFrontOptions): Promise<TpmFront> {
    const { xs, dom } = opts;
    const devid = opts.devid ?? 0;
    const home = `/local/domain/${dom.domid}/device/vtpm/${devid}`;
    const protocol = opts.protocol ?? 'v2';
    // Everything up to the publish leaves in one batch: the other end's details (re-read on every
    // connect, as Linux's xenbus_dev_resume does), on a reconnect our Initialising and the wait for
    // the backend's InitWait (at the backend this client saw last time), and the publish's transaction.
    const details = Promise.all([xs.readString(`${home}/backend-id`), xs.readString(`${home}/backend`)]);
    const last = opts.reconnect ? lastBackend.get(xs)?.get(home) : undefined;
    const known = last?.dev;
    // Those reads leave now: xenstored answers them while we build the new ring (synchronous hypercalls).
    if (last?.answeredClose) {
      xs.flush();
      return TpmFront.#resume(opts, home, last.dev, details);
    }
    // Reconnecting after suspend or a backend restart: back to Initialising first, as Linux's
    // xenbus_dev_resume does, so the backend drops the old ring before it reads the new one. A backend
    // still serving our old ring drops it and goes to InitWait; a dead one stays Connected until its
    // successor takes the device over (and goes to InitWait itself). After a suspend the backend is
    // at InitWait already, so the wait's first read answers it.
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const initialising = opts.reconnect ? switchState(xs, home, XenbusState.Initialising) : undefined;
    const stop = new AbortController();
    let initWait = known ? waitForState(xs, known.backend, (s) => s === XenbusState.InitWait, { timeoutMs, signal: stop.signal }) : undefined;
    initWait?.catch(() => {});
    const tx = xs.transactionStart();
    tx.catch(() => {});
    xs.flush();
    const build = (backDomid: number): TpmTransport => TpmFront.#build(opts, backDomid);
    // The new ring is built while that batch is under way (it needs only the backend's domid).
    let transport: TpmTransport | undefined = known ? build(known.backDomid) : undefined;
    let dev: VtpmDevice;
    let backDomid: number;
    try {
      const [backendId, backend] = await details;
      backDomid = Number(backendId);
      if (!Number.isInteger(backDomid)) throw new FrontendError('ENODEV', `${home}/backend-id is not a domid`);
      dev = vtpmDevice(dom.domid, devid, backDomid);
      if (backend !== dev.backend) throw new FrontendError('ENODEV', `${home}/backend is ${backend}, expected ${dev.backend}`);
      if (opts.reconnect) {
        if (!known || known.backend !== dev.backend) {
          stop.abort(WAIT_STOPPED);
          initWait = waitForState(xs, dev.backend, (s) => s === XenbusState.InitWait, { timeoutMs });
        }
        await Promise.all([initialising, initWait]);
        trace('front initwait');
      }
      if (transport && known!.backDomid !== backDomid) {
        await transport.close();
        transport = undefined;
      }
      transport ??= build(backDomid);
    } catch (err) {
      stop.abort(WAIT_STOPPED);
      void tx.then((id) => xs.transactionEnd(id, false)).catch(() => {});
      await transport?.close();
      throw err;
    }
    trace('front ring built');
    remember(xs, home, dev);
    try {
      await frontendConnect(
        xs,
        dev,
        {
          ringRef: transport.refs[0]!,
          eventChannel: transport.port,
          extra: protocol === 'ring' ? { [XS_FEATURE_RING]: '1' } : {},
        },
        { timeoutMs: opts.timeoutMs, requireBackendFeature: protocol === 'ring' ? XS_FEATURE_RING : undefined, tx },
      );
    } catch (err) {
      await transport.close();
      throw err;
    }
    return TpmFront.#following(opts, dev, transport);
  }

  /**
   * Resume after a close the backend answered: the other end's details, Initialising, the new ring
   * (built for the backend seen last time) and Initialised go in one batch (frontendReconnect). Should
   * the details name another backend, that ring is taken back and the device published again for it.
   */
  static async #resume(opts: TpmFrontOptions, home: string, dev: VtpmDevice, details: Promise<[string, string]>): Promise<TpmFront> {
    const { xs, dom } = opts;
    const protocol = opts.protocol ?? 'v2';
    let transport = TpmFront.#build(opts, dev.backDomid);
    const connectOpts = (t: TpmTransport) => ({
      timeoutMs: opts.timeoutMs,
      requireBackendFeature: protocol === 'ring' ? XS_FEATURE_RING : undefined,
      ...(t instanceof RingFront ? { connected: t.notified } : {}),
    });
    const ring = (t: TpmTransport): FrontendRing => ({ ringRef: t.refs[0]!, eventChannel: t.port, extra: protocol === 'ring' ? { [XS_FEATURE_RING]: '1' } : {} });
    remember(xs, home, dev);
    const published = frontendReconnect(xs, dev, ring(transport), connectOpts(transport));
    published.catch(() => {});
    try {
      const [backendId, backend] = await details;
      const backDomid = Number(backendId);
      if (!Number.isInteger(backDomid)) throw new FrontendError('ENODEV', `${home}/backend-id is not a domid`);
      const actual = vtpmDevice(dom.domid, opts.devid ?? 0, backDomid);
      if (backend !== actual.backend) throw new FrontendError('ENODEV', `${home}/backend is ${backend}, expected ${actual.backend}`);
      if (actual.backend !== dev.backend) {
        // The wrong backend never answers that publish: its wait ends with its timeout, unobserved.
        await transport.close();
        transport = TpmFront.#build(opts, backDomid);
        dev = actual;
        remember(xs, home, dev);
        await frontendReconnect(xs, dev, ring(transport), connectOpts(transport));
      } else await published;
    } catch (err) {
      await transport.close();
      throw err;
    }
    return TpmFront.#following(opts, dev, transport, protocol === 'ring');
  }

  static #build(opts: TpmFrontOptions, backDomid: number): TpmTransport {
    if (opts.pollUs !== undefined) opts.dom.evtchn.busyPollUs = opts.pollUs;
    return (opts.protocol ?? 'v2') === 'ring'
      ? new RingFront(opts.dom, backDomid, { segments: opts.segments, firstId: opts.firstId, pollUs: opts.pollUs, contended: opts.pollContended })
      : new V2Front(opts.dom, backDomid, { pollUs: opts.pollUs, commandTimeoutMs: opts.commandTimeoutMs, contended: opts.pollContended });
  }

  /** The device is Connected: follow the backend's state from now on. */
  static #following(opts: TpmFrontOptions, dev: VtpmDevice, transport: TpmTransport, signalled = false): TpmFront {
    const xs = opts.xs;
    const front = new TpmFront(xs, dev, transport);
    // Not waited for: the WATCH goes out before anything we send later, and fires once registered.
    // `signalled`: a resume that may have gone on at the backend's event (an early InitWait is stale).
    front.#backendWatch = followBackend(xs, dev, (s) => {
      // The backend closing (or vanishing) ends the device from our side too, as xen-tpmfront does.
      if (!front.#closed && s === XenbusState.InitWait && opts.onBackendReset) {
        front.#closed = true;
        void front.#backendWatch?.then((w) => w.close()).catch(() => {});
        // The dead backend never unmaps our pages; release our side without waiting on it.
        front.#closing = front.#transport.close();
        opts.onBackendReset();
        return;
      }
      if (!front.#closed && (s === XenbusState.Closing || s === XenbusState.Closed || s === XenbusState.Unknown)) {
        // A backend that went away may have taken the directories with it: look before writing.
        front.#connected = false;
        void front.close().then(() => opts.onClosed?.(`backend went to ${XenbusState[s]}`));
      }
    }, { signalled });
    front.#backendWatch.catch(() => {});
    return front;
  }

  /** The transport underneath (for protocol studies and fault injection, see hostile.ts). */
  get transport(): TpmTransport {
    return this.#transport;
  }

  get refs(): readonly number[] {
    return this.#transport.refs;
  }

  get port(): number {
    return this.#transport.port;
  }

  transmit(command: Uint8Array, opts?: TransmitOptions): Promise<Uint8Array> {
    return this.#transport.transmit(command, opts);
  }

  /** Cancel what is outstanding; on the ring protocol `id` names one request. */
  cancel(id?: bigint): void {
    if (id !== undefined && this.#transport instanceof RingFront) this.#transport.cancel(id);
    else this.#transport.cancel();
  }

  /** The id the next ring request will carry (ring protocol), for resume. */
  get nextId(): bigint | undefined {
    return this.#transport instanceof RingFront ? this.#transport.nextId : undefined;
  }

  /**
   * The close sequence: Closing, wait for the backend (up to timeoutMs, default 5 s as Linux; a suspend
   * waits for the backend to answer what is in flight), Closed; then release the ring. `suspend`: the
   * guest closes a device it is using (not one the toolstack may be removing), so our state node is
   * still the Connected we wrote unless the backend said otherwise meanwhile: no need to read it.
   */
  close(opts: { timeoutMs?: number; suspend?: boolean } = {}): Promise<void> {
    // Every caller (the backend-state watch, a suspend) waits for the same close sequence to finish.
    this.#closing ??= this.#close(opts.timeoutMs ?? 5000, opts.suspend ?? false);
    return this.#closing;
  }

  async #close(timeoutMs: number, suspend: boolean): Promise<void> {
    this.#closed = true;
    // No need to wait for the UNWATCH's reply: requests on the connection stay in order.
    void this.#backendWatch?.then((w) => w.close()).catch(() => {});
    try {
      // Only this object writes our state node once connected.
      const s = suspend && this.#connected ? XenbusState.Connected : await readState(this.#xs, this.dev.frontend);
      // The ring carries the suspend to the backend one hop sooner than xenstore can (it goes Closing
      // on it); the Closing below keeps the xenbus walk as Linux's.
      const ring = suspend && s === XenbusState.Connected && this.#transport instanceof RingFront ? this.#transport : undefined;
      this.#connected = false;
      if (s !== XenbusState.Closed && s !== XenbusState.Unknown) {
        // The notice goes out right after the Closing batch has left (that write is queued for this
        // tick's end): its event-channel write wakes the backend, which on a busy machine may take our
        // CPU before we would have sent the Closing. Its answer on the ring says what the backend's
        // Closing says (all answered, state durable) one hop sooner than xenstore would.
        const notice = ring ? new Promise<boolean>((r) => process.nextTick(() => void ring.announceSuspend().then(r))) : undefined;
        const release = (): Promise<void> => this.#transport.close();
        const answered = await frontendClose(this.#xs, this.dev, { timeoutMs, closing: s === XenbusState.Closing, release, ...(notice ? { answered: notice } : {}) });
        const last = lastBackend.get(this.#xs)?.get(this.dev.frontend);
        if (last && last.dev.backend === this.dev.backend) last.answeredClose = answered;
        trace('front closed');
      }
    } catch {
      // xenstore gone (host down): nothing left to tell; still release our side.
    }
    await this.#transport.close();
  }
}
