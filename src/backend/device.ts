// One vTPM device as the backend sees it: the xenbus state machine of its backend directory, driven by
// the frontend's state (docs/protocols/xenbus.md), the channel (v2 page or multi-request ring) while connected,
// and the guest's vTPM instance behind it. Transitions run one at a time, in order.
import type { Domain } from '../xen/index.js';
import type { XsClient, XsWatch } from '../xenstore/client.js';
import { deviceFatal, readState, switchState, type VtpmDevice, XenbusState } from '../xenstore/xenbus.js';
import { backendConnected, backendInitWait, parseFrontendRing } from '../xenstore/xenbus-backend.js';
import { XS_FEATURE_RING, XS_FEATURE_V2 } from '../xen/tpmif.js';
import { openChannel, type Channel, type ChannelOptions } from './channel.js';
import type { VtpmProvider, VtpmSession } from './provider.js';
import { trace } from '../util/trace.js';
import { claimsOf, parkMs, readAttachKeys, suspendBoundMs, type AttachKeys } from './device-keys.js';
import { DeviceObservation, captureKeys, observeTarget } from './observe.js';
import type { XsCaptureRouter } from './capture.js';

export interface DeviceOptions {
  dom: Domain;
  xs: XsClient;
  dev: VtpmDevice;
  vtpms: VtpmProvider;
  log: (line: string) => void;
  /** Called once the device is finished (frontend gone or toolstack removed it). */
  onGone: () => void;
  /** Where a device's capture registers for its xenstore traffic (docs/observability.md). */
  captures?: XsCaptureRouter;
}

export class BackendDevice {
  readonly dev: VtpmDevice;
  readonly #o: DeviceOptions;
  #watch: XsWatch | null = null;
  #ownWatch: XsWatch | null = null;
  #channel: Channel | null = null;
  #vtpm: VtpmSession | null = null;
  #chain: Promise<void> = Promise.resolve();
  #fatal = false;
  #gone = false;
  /** ring-ref/event-channel a frontend published for a backend that died: dead, wait for new ones. */
  #stale: string | null = null;
  /** This backend took over a device a previous backend process had connected: keep volatile state. */
  #recovered = false;
  /** The ring was taken down at a suspend notice; the connection ends at the frontend's Closed. */
  #closingEarly = false;
  #feQueued = false;
  /**
   * control/shutdown as read when the frontend began to close (its suspend notice or Closing): whether
   * the close is a suspend. Read then, not at its Closed, by when the toolstack may have cleared it.
   */
  #shutdown: Promise<string | undefined> | null = null;
  /** The request id of the last read of the frontend's state (0: none yet). */
  #stateRead = 0;
  /** The frontend state the last step acted on (steps act on changes only). */
  #lastFrontend: XenbusState | undefined;
  /** ring-ref/event-channel of the ring the channel serves. */
  #serving = '';
  /** We switched to Closing for this connection already (the frontend's suspend notice on the ring). */
  #closingSent = false;
  /** The toolstack set online = 0 (detach): a frontend that closes finishes the device. */
  #offline = false;
  /** The guest suspended and its vTPM, checkpointed at the manager, stays loaded for the resume. */
  #parked: NodeJS.Timeout | null = null;
  /** The VM this device holds (see `claims`), from its first attach until the device is gone. */
  #claimed: string | null = null;
  /** Metrics of this guest, and its capture if the toolstack asked for one (docs/observability.md). */
  readonly #obs: DeviceObservation;

  constructor(o: DeviceOptions) {
    this.#o = o;
    this.dev = o.dev;
    this.#obs = new DeviceObservation(this, o.dev.frontDomid, o.dev.devid, o.log, o.captures);
  }

  get connected(): boolean {
    return this.#channel !== null;
  }

  get instance(): number | undefined {
    return this.#vtpm?.instance;
  }

  /** Advertise our features, go to InitWait and follow the frontend from there. */
  async start(): Promise<void> {
    // A device already Connected belongs to a backend process that died (killed, crashed). Its event
    // channel died with it, so the frontend must reconnect with a new ring (it does so when it sees us
    // go back to InitWait); until then what it published is stale. A capture starts before our first step.
    const [frontState, ...capture] = await Promise.all([readState(this.#o.xs, this.dev.frontend), ...captureKeys(this.#o.xs, this.dev.backend)]);
    await this.#obs.open(...capture);
    if (frontState === XenbusState.Connected) {
      this.#stale = await this.#published();
      this.#recovered = true;
      this.#o.log(`dom${this.dev.frontDomid}: recovering a connected device; waiting for the frontend to reconnect`);
    }
    await backendInitWait(this.#o.xs, this.dev, { [XS_FEATURE_V2]: '1', [XS_FEATURE_RING]: '1' });
    this.#obs.show('InitWait');
    // The frontend's state is read when its step's turn comes, not when the event arrives (as Linux's
    // otherend_changed reads it): a step must never act on a state older than what an earlier step
    // already saw. A reconnecting frontend's Initialising read early but handled after we attached to
    // the ring it published next would tear that ring down again.
    // One read per burst of events (Initialised right behind Initialising): a queued step reads for all.
    this.#watch = await this.#o.xs.watch(`${this.dev.frontend}/state`, () => {
      // An event that arrives before the answer to our last read of the state is covered by that read
      // (xenstored answers in order): the Closed right behind a Closing costs no second read.
      if (this.#stateRead !== 0 && !this.#o.xs.answered(this.#stateRead)) return;
      if (!this.#feQueued) this.#enqueue(() => ((this.#feQueued = false), this.#frontendChanged()));
      this.#feQueued = true;
    });
    // The toolstack detaches a device by writing online=0 and state=Closing into our directory.
    this.#ownWatch = await this.#o.xs.watch(`${this.dev.backend}/online`, () => this.#enqueue(() => this.#onOnline()));
  }

  #enqueue(step: () => Promise<void>): void {
    this.#chain = this.#chain.then(step).catch((err: unknown) => {
      this.#o.log(`${this.dev.backend}: ${err instanceof Error ? err.message : String(err)}`);
    });
  }

  async #frontendChanged(): Promise<void> {
    if (this.#gone) return;
    // While we wait for a ring, what an attach needs is read in the same batch as the state (one
    // round trip less on the resume path; the keys read right after a state that says Initialised
    // are that state's, as the frontend changes them together in a transaction). Not while a ring
    // taken down at a suspend notice still awaits the frontend's Closing and Closed: those reads would
    // carry eight keys each for nothing, and a frontend already past them costs one read more.
    const statePromise = readState(this.#o.xs, this.dev.frontend);
    this.#stateRead = this.#o.xs.lastRequestId;
    const keys = !this.#channel && !this.#fatal && !this.#closingEarly ? readAttachKeys(this.#o.xs, this.dev) : null;
    keys?.catch(() => {});
    let s: XenbusState;
    try {
      s = await statePromise;
    } catch {
      return; // connection gone: the watch ends by itself
    }
    if (s === this.#lastFrontend) return;
    this.#lastFrontend = s;
    trace(`dev fe=${XenbusState[s]}`);
    await this.#onFrontend(s, keys);
  }

  async #onFrontend(s: XenbusState, pre: Promise<AttachKeys> | null = null): Promise<void> {
    if (this.#gone) return;
    switch (s) {
      case XenbusState.Initialised:
      case XenbusState.Connected: {
        if (this.#fatal) break;
        if (this.#channel || this.#closingEarly) {
          // A resuming frontend may pass Closed and Initialising faster than our steps read its state
          // (Linux's tpmfront publishes its new ring without waiting for our InitWait): a ring other
          // than the one we serve is a new connection. End the old one exactly as for Closed first.
          // After a suspend notice (ring taken down) the keys came with this state, or, for a frontend
          // that passed its Closing and Closed unread, come in one read now: it is a new ring.
          const keys = pre ?? (this.#closingEarly ? readAttachKeys(this.#o.xs, this.dev) : null);
          const [ringRef, eventChannel] = keys
            ? await keys.then((k) => [k.ringRef, k.eventChannel])
            : await Promise.all([this.#o.xs.tryRead(`${this.dev.frontend}/ring-ref`), this.#o.xs.tryRead(`${this.dev.frontend}/event-channel`)]);
          if (`${ringRef ?? ''}/${eventChannel ?? ''}` === this.#serving) break;
          await this.#closed();
          if (this.#gone || this.#offline) break;
          // #closed wrote our InitWait (the keys read before it show our Closing); the frontend's keys
          // read with its Initialised are that state's.
          await this.#attach(s, keys ? { ...(await keys), own: XenbusState.InitWait } : await readAttachKeys(this.#o.xs, this.dev));
          break;
        }
        const keys = await (pre ?? readAttachKeys(this.#o.xs, this.dev));
        // A ring published for a backend that died is not ours to map: wait for a new one.
        if (this.#stale !== null && `${keys.ringRef ?? ''}/${keys.eventChannel ?? ''}` === this.#stale) break;
        this.#stale = null;
        await this.#attach(s, keys);
        break;
      }
      case XenbusState.Initialising:
        // A frontend back at Initialising while we still serve its ring is resuming with a new one. It
        // may have passed through Closed too quickly for us to read it (a suspend): close the old
        // connection exactly as for Closed.
        if (this.#channel || this.#closingEarly) await this.#closed();
        break;
      case XenbusState.Closing:
        // Suspend (or close): answer what is in flight before acknowledging, then make the vTPM's
        // volatile state durable, so a resumed guest finds both the answer and the state. (Closing
        // again when the toolstack already wrote it is harmless; Closed only follows a finish.)
        this.#shutdown ??= this.#readShutdown();
        this.#obs.closing();
        await this.#quiesce();
        trace('dev quiesced');
        if (!this.#closingSent) await switchState(this.#o.xs, this.dev.backend, XenbusState.Closing);
        this.#closingSent = true;
        break;
      case XenbusState.Closed:
        await this.#closed();
        break;
      case XenbusState.Unknown:
        // The frontend directory is gone: the domain was destroyed.
        await this.#detach();
        await this.#finish(XenbusState.Closed);
        break;
      default:
        break;
    }
  }

  /** Suspend notice on the ring (op 2): do what the frontend's Closing asks for now; that step finds it done. */
  #suspendNotice(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#enqueue(async () => {
        try {
          if (!this.#channel || this.#gone || this.#closingSent) return resolve();
          this.#shutdown ??= this.#readShutdown();
          this.#obs.closing();
          await this.#quiesce();
          trace('dev quiesced (notice)');
          // The notice's answer (resolve) says what our Closing says, which then needs no reading
          // back. The Closing leaves first, so no later request of the frontend's reads our Connected.
          const closing = switchState(this.#o.xs, this.dev.backend, XenbusState.Closing);
          this.#o.xs.flush();
          this.#closingSent = true;
          resolve();
          closing.catch((e: unknown) => this.#o.log(`dom${this.dev.frontDomid}: Closing after the suspend notice: ${(e as Error).message}`));
          // Nothing more comes on this ring: take it down now, not after the Closed (the resume's turn).
          this.#closingEarly = true;
          await this.#detach().then(() => trace('dev detached (notice)'));
        } catch (err) {
          reject(err as Error);
        }
      });
    });
  }

  /** The frontend closed its end: drop the ring; keep or release the vTPM; wait for a new connection. */
  async #closed(): Promise<void> {
    // One batch, sent before the ring is taken down: a resuming frontend waits for our InitWait; what
    // it publishes next is a later step of this queue. control/shutdown decides only what becomes of
    // the vTPM (durable already), settled here before the queue looks at the frontend again.
    const offline = this.#offline;
    const control = this.#shutdown ?? this.#readShutdown();
    this.#shutdown = null;
    const batch = Promise.all([
      control,
      this.#o.xs.rm(`${this.dev.backend}/ready`).catch(() => {}),
      offline ? undefined : switchState(this.#o.xs, this.dev.backend, XenbusState.InitWait),
    ]);
    batch.catch(() => {});
    // The batch leaves before the channel's unmaps and port close (synchronous hypercalls), so the
    // frontend reads our InitWait while we take the old ring down.
    this.#o.xs.flush();
    await this.#detach();
    this.#closingSent = false;
    this.#closingEarly = false;
    trace('dev detached');
    const [shutdown] = await batch;
    this.#fatal = false;
    if (this.#vtpm && shutdown === 'suspend') await this.#suspended(this.#vtpm).then(() => this.#obs.suspended());
    this.#obs.closed(offline);
    if (offline) await this.#finish(XenbusState.Closed);
  }

  /**
   * The guest's control/shutdown. A vTPM stub domain may not read it (as under Xen): then the close is
   * no suspend to it, and its vTPM, checkpointed by quiesce, stays loaded until detach.
   */
  #readShutdown(): Promise<string | undefined> {
    return this.#o.xs.tryRead(`/local/domain/${this.dev.frontDomid}/control/shutdown`).catch(() => undefined);
  }

  /**
   * The guest suspended; its vTPM's state (with the exactly-once table) is durable at the manager, where
   * a successor of a dead backend resumes it from. One that can checkpoint stays loaded, so a resume
   * here skips the reload (library, TPMLIB_MainInit, manager OPEN); the others go back at once.
   */
  async #suspended(vtpm: VtpmSession): Promise<void> {
    const park = parkMs();
    if (vtpm.checkpoint && park > 0) {
      // Nothing to store when quiesce's checkpoint covers everything that ran (always, on the ring).
      // One that fails (the manager down) leaves the vTPM loaded with what it had: still parked, and
      // the next checkpoint, or the release, stores it.
      const saved = await vtpm.checkpoint().then(
        () => true,
        (e: unknown) => (this.#o.log(`dom${this.dev.frontDomid}: checkpoint at suspend: ${(e as Error).message}`), false),
      );
      this.#park(park);
      this.#o.log(`dom${this.dev.frontDomid}: suspended, vTPM instance ${vtpm.instance} ${saved ? 'saved' : 'NOT saved'} (kept loaded for the resume)`);
      return;
    }
    this.#vtpm = null;
    await this.#o.vtpms.release(vtpm.instance);
    this.#o.log(`dom${this.dev.frontDomid}: suspended, vTPM instance ${vtpm.instance} saved`);
  }

  #park(ms: number): void {
    this.#unpark();
    this.#parked = setTimeout(() => this.#enqueue(() => this.#releaseParked()), ms);
    this.#parked.unref();
  }

  #unpark(): void {
    if (this.#parked) clearTimeout(this.#parked);
    this.#parked = null;
  }

  /** No resume came in time: give the parked vTPM back to the manager. */
  async #releaseParked(): Promise<void> {
    if (!this.#parked || this.#channel || !this.#vtpm) return;
    this.#parked = null;
    const inst = this.#vtpm.instance;
    this.#vtpm = null;
    await this.#o.vtpms.release(inst);
    this.#o.log(`dom${this.dev.frontDomid}: no resume within ${parkMs()} ms; vTPM instance ${inst} released`);
  }

  async #published(): Promise<string> {
    const [r, e] = await Promise.all([
      this.#o.xs.tryRead(`${this.dev.frontend}/ring-ref`),
      this.#o.xs.tryRead(`${this.dev.frontend}/event-channel`),
    ]);
    return `${r ?? ''}/${e ?? ''}`;
  }

  /** Answer every accepted request, cancelling through libtpms what outlives the bound; then checkpoint. */
  async #quiesce(): Promise<void> {
    const ch = this.#channel;
    if (!ch) return;
    let timer: NodeJS.Timeout | undefined;
    const bound = suspendBoundMs();
    const overdue = new Promise<'overdue'>((r) => (timer = setTimeout(() => r('overdue'), bound)));
    if ((await Promise.race([ch.drain().then(() => 'done' as const), overdue])) === 'overdue') {
      this.#o.log(`dom${this.dev.frontDomid}: command still running after ${bound} ms at suspend; cancelling it`);
      this.#vtpm?.cancel();
      await ch.drain();
    }
    clearTimeout(timer);
    await this.#vtpm?.checkpoint?.().catch((e: unknown) => this.#o.log(`dom${this.dev.frontDomid}: checkpoint: ${(e as Error).message}`));
  }

  async #onOnline(): Promise<void> {
    if (this.#gone) return;
    this.#offline = (await this.#o.xs.tryRead(`${this.dev.backend}/online`)) === '0';
    if (!this.#offline) return;
    // Detach requested: finish what is in flight, then let the frontend close.
    await this.#channel?.drain();
    const fe = await readState(this.#o.xs, this.dev.frontend);
    if (fe === XenbusState.Closed || fe === XenbusState.Unknown || !this.#channel) {
      await this.#detach();
      await this.#finish(XenbusState.Closed);
    } else await switchState(this.#o.xs, this.dev.backend, XenbusState.Closing);
  }

  /** Connect to the ring the frontend (seen in `feState`) published, if we are waiting for one (InitWait). */
  async #attach(feState: XenbusState, keys: AttachKeys): Promise<void> {
    const xs = this.#o.xs;
    if (keys.own !== XenbusState.InitWait) return;
    const t0 = performance.now();
    let fe: ReturnType<typeof parseFrontendRing>;
    try {
      fe = parseFrontendRing(this.dev, feState, keys.ringRef, keys.eventChannel, keys.protocolV2);
    } catch (err) {
      // as a Linux backend's xenbus_dev_fatal when the ring-ref it reads is no number: cut off
      return this.#fail(22, (err as Error).message, 'bad_xenstore_keys');
    }
    const vm = keys.uuid;
    const wantsRing = keys.ring === '1';
    if (!wantsRing && !fe.protocolV2) return this.#fail(22, 'frontend did not publish feature-protocol-v2', 'bad_xenstore_keys');
    if (!vm) return this.#fail(22, 'backend directory has no uuid (the VM the vTPM belongs to)', 'toolstack');
    const version = keys.version === '1.2' ? '1.2' : '2.0';
    const resume = this.#recovered || keys.resume === 'True';
    const held = claimsOf(this.#o.vtpms);
    const holder = held.get(vm);
    if (holder !== undefined && holder !== this.dev.backend) return this.#fail(16, `VM ${vm} already has a vTPM device (${holder}); one VM's vTPM serves one guest`, 'toolstack');
    if (this.#claimed !== null && this.#claimed !== vm) return this.#fail(22, `uuid changed from VM ${this.#claimed} to ${vm} on a live device`, 'toolstack');
    held.set(vm, this.dev.backend);
    this.#claimed = vm;
    if (this.#parked) {
      this.#unpark();
      // A parked vTPM is the suspended guest's, checkpointed: a resume carries on with it as it is. A
      // frontend connecting without resume boots the vTPM afresh, which only the manager path does.
      if (!resume && this.#vtpm) {
        const inst = this.#vtpm.instance;
        this.#vtpm = null;
        await this.#o.vtpms.release(inst);
      }
    }
    try {
      this.#vtpm ??= await this.#o.vtpms.open(vm, version, { resume });
    } catch (err) {
      return this.#fail(5, `cannot open the vTPM of VM ${vm}: ${(err as Error).message}`, 'vtpm_unavailable');
    }
    const observer = this.#obs.attach(vm, wantsRing ? 'ring' : 'v2');
    const opts: ChannelOptions = {
      frontDomid: this.dev.frontDomid,
      refs: [fe.ringRef],
      port: fe.eventChannel,
      target: observeTarget(this.#vtpm, observer),
      onFatal: (reason: string, kind: string) => this.#enqueue(() => this.#fail(71, reason, kind)),
      ...(observer.capture ? { tap: observer.capture.ring } : {}),
      onSuspend: () => this.#suspendNotice(),
      log: this.#o.log,
    };
    trace('dev vtpm ready');
    try {
      this.#channel = openChannel(this.#o.dom, wantsRing ? 'ring' : 'v2', opts);
      trace('dev channel ready');
    } catch (err) {
      return this.#fail(5, `cannot map ring-ref ${fe.ringRef} / bind event-channel ${fe.eventChannel}: ${(err as Error).message}`, 'bad_grant');
    }
    this.#serving = `${keys.ringRef ?? ''}/${keys.eventChannel ?? ''}`;
    this.#shutdown = null;
    this.#closingSent = false;
    this.#closingEarly = false;
    const connected = backendConnected(xs, this.dev);
    xs.flush();
    // Once Connected has left for xenstored (in the kernel: it is applied even if we die now), not once
    // applied: a frontend that goes on at this event takes an InitWait it reads before any Connected as
    // stale (followBackend). Only a backend that bound the new port can send it.
    const early = xs.sent;
    if (early) this.#channel?.notifyConnected?.();
    trace('dev connected signalled');
    await connected;
    if (!early) this.#channel?.notifyConnected?.();
    this.#obs.connected(resume, t0);
    this.#o.log(`dom${this.dev.frontDomid}: connected (${wantsRing ? 'ring' : 'v2'}), vTPM instance ${this.#vtpm.instance} of VM ${vm}`);
  }

  /** Cut this frontend off: the reason in error/ and the log, our side to Closing. `kind` is the metric's reason. */
  async #fail(errno: number, reason: string, kind: string): Promise<void> {
    this.#fatal = true;
    this.#o.log(`dom${this.dev.frontDomid}: cut off: ${reason}`);
    this.#obs.cutOff(kind, reason);
    this.#channel?.close();
    this.#channel = null;
    await deviceFatal(this.#o.xs, this.dev.backend, errno, reason);
  }

  async #detach(): Promise<void> {
    const ch = this.#channel;
    if (!ch) return;
    await ch.drain();
    ch.close();
    this.#channel = null;
  }

  async #finish(state: XenbusState): Promise<void> {
    if (this.#gone) return;
    this.#gone = true;
    this.#unpark();
    await this.#watch?.close().catch(() => {});
    await this.#ownWatch?.close().catch(() => {});
    if (this.#vtpm) await this.#o.vtpms.release(this.#vtpm.instance).catch((e: unknown) => this.#o.log(`release: ${(e as Error).message}`));
    this.#vtpm = null;
    this.#unclaim();
    this.#obs.end();
    // Only into a directory that is still there: a write would re-create one the toolstack removed.
    const xs = this.#o.xs;
    await xs
      .transaction(async (tx) => {
        if (await xs.exists(`${this.dev.backend}/frontend`, tx)) await switchState(xs, this.dev.backend, state, tx);
      })
      .catch(() => {});
    this.#o.onGone();
  }

  /** Backend shutdown: answer what is in flight, then release the channel and the vTPM. */
  async stop(): Promise<void> {
    this.#gone = true;
    this.#unpark();
    await this.#chain;
    await this.#watch?.close().catch(() => {});
    await this.#ownWatch?.close().catch(() => {});
    await this.#detach();
    if (this.#vtpm) await this.#o.vtpms.release(this.#vtpm.instance).catch(() => {});
    this.#vtpm = null;
    this.#unclaim();
    this.#obs.end();
  }

  #unclaim(): void {
    if (this.#claimed === null) return;
    const held = claimsOf(this.#o.vtpms);
    if (held.get(this.#claimed) === this.dev.backend) held.delete(this.#claimed);
    this.#claimed = null;
  }
}
