// One vTPM: a private copy of libtpms, its durable state behind a StateStore, and a queue that lets
// exactly one operation (command, power change, blob transfer) touch the copy at a time.
//
// Where commands run: koffi async calls on the libuv pool (docs/engine.md, Off the event loop), NV
// callbacks relayed to the JS thread (nv-state.ts); `inline: 'fast'` runs an allow-list in line.
//
// Durability. Every NV write or delete libtpms makes during an operation is captured by the callbacks
// and applied to the StateStore after libtpms returns; the response is released only once every store()
// has resolved. A failed store() leaves the TPM's memory ahead of its durable state, so the instance is
// put in the failed state (isolated) and must be recreated from the store. Writes go out in one chain
// per instance, so a response waits for every earlier write too; that lets TpmHost.create's own Startup
// (a response nobody else sees) return before its write is done, overlapping it with the first command.
import { EventEmitter } from 'node:events';
import { Libtpms, TPM_SUCCESS, TpmVersionChoice } from '../../native/libtpms.js';
import type { SwtpmVtpm } from './vtpm.js';
import { isFastCommand } from './fast-path.js';
import { Limiter } from './limiter.js';
import {
  DEFAULT_BUFFER_SIZE,
  TpmInstanceError,
  checkInstanceNumber,
  type ExecuteOptions,
  type FailureInfo,
  type InstanceOptions,
  type InstanceStatus,
} from './instance-types.js';
import { NvState } from './nv-state.js';
import { shutdownCommand, startupCommand } from './power-commands.js';
import { StateTransfer } from './state-transfer.js';
import { NVRAM_NAME } from './state-blob.js';
import { SPARE_STORE, STATE_KINDS, type StateKind, type StateStore } from './state-store.js';
import { errorResponse, fatalErrorCode, sizeErrorCode } from './error-response.js';
import { isFailureModeResponse, responseCode, type TpmVersion } from './wire.js';

export type { TpmVersion } from './wire.js';

/**
 * Events: 'failure' (FailureInfo) when the instance enters the failed state.
 * Create instances with TpmHost.create() (or TpmInstance.create() with your own limiter).
 */
export class TpmInstance extends EventEmitter implements SwtpmVtpm {
  readonly version: TpmVersion;
  readonly #limiter: Limiter;
  readonly #wantedBufferSize: number;
  // Set at construction, or when a spare is bound (bindSpare); never changed after.
  #instance: number;
  #store: StateStore;
  #inlineFast: boolean;
  /** A spare from manufacture(), not bound to an instance number yet. */
  #spare = false;
  #fromSpare = false;
  #lib: Libtpms | null = null;
  #status: InstanceStatus = 'off';
  #queue: Promise<unknown> = Promise.resolve();
  readonly #nv: NvState;
  readonly #transfer: StateTransfer;
  #locality = 0;
  #bufferSize = 4096;
  #busy = false;
  #queued = 0;
  #failure: FailureInfo | null = null;
  #cancelTimer: NodeJS.Timeout | null = null;

  private constructor(opts: InstanceOptions, limiter: Limiter, spare = false) {
    super();
    if (!spare) checkInstanceNumber(opts.instance);
    if (opts.version !== '2.0' && opts.version !== '1.2') throw new RangeError(`bad TPM version ${String(opts.version)}`);
    this.#instance = opts.instance;
    this.version = opts.version;
    this.#store = opts.store;
    this.#limiter = limiter;
    this.#wantedBufferSize = opts.bufferSize ?? DEFAULT_BUFFER_SIZE;
    this.#inlineFast = opts.inline === 'fast';
    this.#spare = spare;
    this.#nv = new NvState(this, (msg) => {
      this.#fail({ instance: this.instance, reason: 'store', message: msg });
      return new TpmInstanceError('STORE', this.instance, msg);
    });
    this.#transfer = new StateTransfer({
      instance: () => this.instance,
      status: () => this.#status,
      nv: this.#nv,
      enqueue: (op) => this.#enqueue(op),
      requireLib: () => this.#requireLib(),
      inLibrary: (fn) => this.#inLibrary(fn),
    });
  }

  /** The instance number: the key of its state in the store (-1 for a spare not yet bound). */
  get instance(): number {
    return this.#instance;
  }

  get store(): StateStore {
    return this.#store;
  }

  /** A powered-off instance with its library copy loaded; call powerOn() (or use TpmHost.create). */
  static load(opts: InstanceOptions, limiter: Limiter): TpmInstance {
    const inst = new TpmInstance(opts, limiter);
    inst.#loadLibrary();
    return inst;
  }

  // ---- Spares (TpmHost option `spares`) ----------------------------------------------------------
  // Manufacturing a TPM (TPMLIB_MainInit on empty NV: fresh seeds, default permanent state) is most of
  // the time to a new TPM (~2 ms for 2.0; for 1.2, which makes its EK and SRK then, 100–400 ms). A
  // spare is that work done ahead of time: a private library copy, powered on with no state at all.
  // What manufacture wrote exists only in this object (its NvState): it was never stored or shown to
  // anyone. bindSpare() gives it an instance number and store; the pending permanent state is then
  // written under that number before the first response is released, exactly as for a TPM
  // manufactured on demand, so the durability contract does not change.

  /** A freshly manufactured, powered-on TPM bound to nothing; only TpmHost hands these out. */
  static async manufacture(version: TpmVersion, limiter: Limiter): Promise<TpmInstance> {
    const inst = new TpmInstance({ instance: -1, version, store: SPARE_STORE }, limiter, true);
    try {
      inst.#loadLibrary();
      await inst.#enqueue(() => inst.#powerOn());
    } catch (err) {
      await inst.destroy().catch(() => undefined);
      throw err;
    }
    return inst;
  }

  /** True for a spare from manufacture() that has not been bound yet. */
  get isSpare(): boolean {
    return this.#spare;
  }

  /** True when this instance began as a spare (was manufactured before it was asked for). */
  get fromSpare(): boolean {
    return this.#fromSpare;
  }

  /**
   * Make this spare the TPM of `opts.instance`, whose store must hold no state (the caller checked).
   * Works once: a bound TPM is no spare any more, so it can never be handed out a second time.
   */
  bindSpare(opts: InstanceOptions): void {
    if (!this.#spare || this.#status !== 'running') throw new TpmInstanceError('RUNNING', this.#instance, 'not an unbound, running spare');
    if (opts.version !== this.version) throw new RangeError(`spare is TPM ${this.version}, not ${opts.version}`);
    if ((opts.bufferSize ?? DEFAULT_BUFFER_SIZE) !== this.#wantedBufferSize) throw new RangeError('a spare has the default buffer size only');
    checkInstanceNumber(opts.instance);
    this.#spare = false;
    this.#fromSpare = true;
    this.#instance = opts.instance;
    this.#store = opts.store;
    this.#inlineFast = opts.inline === 'fast';
    // Its clock has run since manufacture; a TPM must look just manufactured and powered on to its
    // first user (2.0 time and clock, 1.2 ticks). Power-cycle it before anything else runs on it.
    this.#enqueue(() => this.#powerCycleSpare()).catch(() => undefined);
  }

  /**
   * TPMLIB_Terminate and TPMLIB_MainInit on the state manufacture left in memory (#nv): the platform
   * timer starts again at 0, and nothing but the seeds and defaults of manufacture carries over. No
   * store is read or written here; what MainInit writes stays pending like manufacture's writes.
   */
  async #powerCycleSpare(): Promise<void> {
    const lib = this.#requireLib();
    if (this.#status !== 'running') return;
    await this.#inLibrary(() => lib.terminateAsync());
    const rc = await this.#inLibrary(() => lib.mainInitAsync());
    if (rc !== TPM_SUCCESS) {
      const msg = `TPMLIB_MainInit of a bound spare failed with 0x${rc.toString(16)}`;
      this.#fail({ instance: this.instance, reason: 'init', tpmResult: rc, message: msg });
      throw new TpmInstanceError('INIT', this.instance, msg, rc);
    }
  }

  get status(): InstanceStatus {
    return this.#status;
  }

  get failure(): FailureInfo | null {
    return this.#failure;
  }

  /** The command size limit in effect (libtpms' buffer size). */
  get bufferSize(): number {
    return this.#bufferSize;
  }

  /** True while an operation is inside libtpms. */
  get busy(): boolean {
    return this.#busy;
  }

  #loadLibrary(): Libtpms {
    const lib = Libtpms.load();
    const rc = lib.chooseTPMVersion(this.version === '2.0' ? TpmVersionChoice.TPM2 : TpmVersionChoice.TPM12);
    if (rc !== TPM_SUCCESS) {
      lib.unload();
      throw new TpmInstanceError('LIBTPMS', this.instance, 'TPMLIB_ChooseTPMVersion failed', rc);
    }
    lib.registerCallbacks({ ...this.#nv.callbacks(), getLocality: () => this.#locality });
    const b = lib.setBufferSize(this.#wantedBufferSize);
    this.#bufferSize = b.size;
    this.#lib = lib;
    return lib;
  }

  /** Run `op` after every earlier operation on this instance, one at a time. */
  #enqueue<T>(op: () => Promise<T>): Promise<T> {
    this.#queued++;
    const run = this.#queue.then(op, op);
    this.#queue = run.catch(() => undefined).finally(() => this.#queued--);
    return run;
  }

  /** Operations (commands, power changes, blob transfers) queued or running, flushes included. */
  get queued(): number {
    return this.#queued;
  }

  #requireLib(): Libtpms {
    if (this.#status === 'destroyed' || !this.#lib) throw new TpmInstanceError('DESTROYED', this.instance, 'instance destroyed');
    return this.#lib;
  }

  async #inLibrary<T>(fn: () => Promise<T>): Promise<T> {
    return this.#limiter.run(async () => {
      this.#busy = true;
      try {
        return await fn();
      } finally {
        this.#busy = false;
        if (this.#cancelTimer) clearInterval(this.#cancelTimer);
        this.#cancelTimer = null;
      }
    });
  }

  /** Make every captured NV change durable (nv-state.ts); only create()'s own Startup leaves one unawaited. */
  #flush(): Promise<void> {
    return this.#nv.flush();
  }

  #fail(info: FailureInfo): void {
    if (this.#status === 'failed' || this.#status === 'destroyed') return;
    this.#status = 'failed';
    this.#failure = info;
    this.emit('failure', info);
  }

  /**
   * Power on (swtpm CMD_INIT): load state from the store and run TPMLIB_MainInit. With no permanent
   * state in the store this manufactures a new TPM and stores it. Volatile state (from saveVolatile or
   * setStateBlob) resumes the TPM and is then deleted from the store, as `swtpm_ioctl -i` does: a later
   * restart must not resume the same volatile state a second time.
   */
  powerOn(): Promise<void> {
    return this.#enqueue(() => this.#powerOn());
  }

  async #powerOn(): Promise<void> {
    const lib = this.#requireLib();
    if (this.#status === 'running') return;
    if (this.#status === 'failed') throw new TpmInstanceError('FAILED', this.instance, 'instance failed; recreate() it');
    // Blobs set while off are committed while libtpms starts on them, durable before this resolves. A
    // TPM 2.0 with state starts in line: MainInit only loads it (~20 µs), less than a pool hop costs.
    const { ready, durable } = this.#nv.sync();
    await ready;
    const rc = this.version === '2.0' && this.#nv.has('permanent') ? lib.mainInit() : await this.#inLibrary(() => lib.mainInitAsync());
    await durable;
    if (rc !== TPM_SUCCESS) {
      // libtpms may have written nothing useful; keep the store as it was and isolate the copy.
      this.#nv.dropPending();
      await this.#inLibrary(() => lib.terminateAsync());
      const msg = `TPMLIB_MainInit failed with 0x${rc.toString(16)}`;
      this.#fail({ instance: this.instance, reason: 'init', tpmResult: rc, message: msg });
      throw new TpmInstanceError('INIT', this.instance, msg, rc);
    }
    if (this.#nv.has('volatile')) this.#nv.put('volatile', null);
    // What power-on wrote (a manufactured TPM, the consumed volatile state) stays pending: no guest has
    // seen anything of it yet, and the first response (or powerOff/destroy) makes it durable first.
    // That keeps one fsync out of the time to a ready TPM without weakening the contract.
    this.#status = 'running';
  }

  /** Power off (swtpm CMD_STOP): TPMLIB_Terminate. Pending writes go out with whatever next needs them. */
  powerOff(): Promise<void> {
    return this.#enqueue(() => this.#powerOff());
  }

  async #powerOff(): Promise<void> {
    const lib = this.#requireLib();
    if (this.#status !== 'running') return;
    if (this.version === '2.0') lib.terminate(); // frees memory only (~1 µs): in line
    else await this.#inLibrary(() => lib.terminateAsync());
    this.#status = 'off';
  }

  /** Power-cycle: what a platform reset does to a TPM (volatile state lost, Startup needed). */
  reset(): Promise<void> {
    return this.#enqueue(async () => {
      await this.#powerOff();
      await this.#powerOn();
    });
  }

  /**
   * Replace the library copy with a fresh one and power on from the last durable state. The way out of
   * the failed state; also usable on a healthy instance.
   */
  recreate(): Promise<void> {
    return this.#enqueue(async () => {
      if (this.#status === 'destroyed') throw new TpmInstanceError('DESTROYED', this.instance, 'instance destroyed');
      // Whatever was still being written settles first and the rest is dropped: power-on reads the store.
      await this.#nv.settle();
      this.#nv.dropPending();
      const old = this.#lib;
      this.#lib = null;
      if (old) {
        // A failed copy is not trusted to terminate cleanly; dlclose is enough to drop it.
        if (this.#status === 'running') await this.#inLibrary(() => old.terminateAsync());
        old.unload();
      }
      this.#status = 'off';
      this.#failure = null;
      this.#loadLibrary();
      try {
        await this.#powerOn();
      } catch (err) {
        // The store could not be read (manager or its store unreachable): still failed, so the next
        // command tries again instead of meeting a TPM that stays off.
        if (this.#status === 'off') this.#fail({ instance: this.instance, reason: 'store', message: (err as Error).message });
        throw err;
      }
    });
  }

  /**
   * Run one TPM command. Resolves with the TPM's response once every NV change it caused is durable.
   * Wrong-sized commands and commands to a TPM that is off or failed are answered with the error a real
   * TPM (or swtpm) gives, never thrown.
   */
  execute(command: Uint8Array, opts: ExecuteOptions = {}): Promise<Uint8Array> {
    const locality = opts.locality ?? 0;
    if (!Number.isInteger(locality) || locality < 0 || locality > 4) {
      return Promise.reject(new TpmInstanceError('LOCALITY', this.instance, `locality ${locality} not in 0..4`));
    }
    // Our own copy: the caller may reuse its buffer while the command waits in the queue.
    return this.#execute(command.slice(), locality, true);
  }

  #execute(cmd: Uint8Array, locality: number, released: boolean, inline = false): Promise<Uint8Array> {
    return this.#enqueue(async () => {
      const lib = this.#requireLib();
      if (this.#status !== 'running') return errorResponse(this.version, fatalErrorCode(this.version));
      if (cmd.length > this.#bufferSize) return errorResponse(this.version, sizeErrorCode(this.version));
      this.#locality = locality;
      const { rc, response } =
        inline || (this.#inlineFast && isFastCommand(this.version, cmd))
          ? lib.process(cmd)
          : await this.#inLibrary(() => lib.processAsync(cmd));
      const flushed = this.#flush();
      // A response nobody else will see need not wait; the next one released waits for this flush.
      if (released) await flushed;
      else flushed.catch(() => undefined); // a failure fails the instance and every later flush
      return this.#checked(rc, response);
    });
  }

  /**
   * An `inline: 'fast'` command run now, without the queue's promises, if nothing of this instance is
   * queued and its NV is durable: the response (a promise of it if the command wrote NV, settled once
   * that is durable, as execute's); null when it must go through execute(). `command` is not kept.
   */
  executeNow(command: Uint8Array, locality: number): Uint8Array | Promise<Uint8Array> | null {
    const lib = this.#lib;
    if (!lib || !this.canRunNow(command) || !Number.isInteger(locality) || locality < 0 || locality > 4) return null;
    this.#locality = locality;
    const { rc, response } = lib.process(command);
    if (this.#nv.idle) return this.#checked(rc, response);
    return this.#flush().then(() => this.#checked(rc, response));
  }

  /** Whether executeNow would run `command` now. */
  canRunNow(command: Uint8Array): boolean {
    return this.#inlineFast && this.#queued === 0 && this.#status === 'running' && this.#nv.idle && command.length <= this.#bufferSize && isFastCommand(this.version, command);
  }

  /** The response of TPMLIB_Process, or the fatal error answer; the instance fails on either failure. */
  #checked(rc: number, response: Uint8Array): Uint8Array {
    const failed = rc !== TPM_SUCCESS || response.length === 0;
    const code = failed ? rc : isFailureModeResponse(this.version, response) ? responseCode(response) : null;
    if (code === null) return response;
    const message = failed ? `TPMLIB_Process failed with 0x${rc.toString(16)}` : `libtpms entered failure mode (response 0x${code.toString(16)})`;
    this.#fail({ instance: this.instance, reason: 'failure-mode', tpmResult: code, message });
    return failed ? errorResponse(this.version, fatalErrorCode(this.version)) : response;
  }

  /**
   * Ask libtpms to abandon the command now running (TPMLIB_CancelCommand); long TPM 2 operations such as
   * RSA key generation then return TPM_RC_CANCELED. No effect when nothing runs.
   */
  cancel(): void {
    const lib = this.#lib;
    if (!this.#busy || !lib || this.#status !== 'running' || this.#cancelTimer) return;
    // libtpms clears its cancel flag when a command starts (TPM2_Process), so a cancel that lands
    // between our hand-off and the pool thread starting would be lost. Like the TIS cancel bit, hold
    // it: re-assert every few ms until the command returns.
    lib.cancelCommand();
    this.#cancelTimer = setInterval(() => lib.cancelCommand(), 2);
  }

  /** Send TPM(2)_Startup; resolves with the response code (0 = started, 0x100 = already started). */
  async startup(type: 'clear' | 'state' = 'clear'): Promise<number> {
    return responseCode(await this.execute(startupCommand(this.version, type)));
  }

  /**
   * Startup for a caller that keeps the response code to itself and releases nothing that depends on
   * it (TpmHost.create's `startup` option). Resolves as soon as libtpms answered; the NV writes of
   * Startup are made durable meanwhile, and the next response this instance releases waits for them.
   * On a new TPM that overlaps the first store (~0.4 ms on ext4) with the caller's first command.
   *
   * A TPM 2.0 Startup runs in line on the JS thread: it does no key generation, only resets PCRs and
   * session state and writes NV once (~0.1 ms), and in line its NV write reaches us without koffi
   * relaying a callback from a pool thread: two pool hand-offs fewer on the path to a ready TPM.
   * A TPM 1.2 Startup stays on the pool.
   */
  async startupUnreleased(type: 'clear' | 'state' = 'clear'): Promise<number> {
    return responseCode(await this.#execute(startupCommand(this.version, type), 0, false, this.version === '2.0'));
  }

  /**
   * TPM2_Shutdown(SU_CLEAR|SU_STATE); for TPM 1.2, 'state' sends TPM_SaveState (1.2 has no Shutdown,
   * 'clear' is a no-op). Resolves with the response code.
   */
  async shutdown(type: 'clear' | 'state' = 'clear'): Promise<number> {
    const cmd = shutdownCommand(this.version, type);
    return cmd ? responseCode(await this.execute(cmd)) : 0;
  }

  /** TPMLIB_VolatileAll_Store into the store (for suspend): resolves once it is durable. */
  saveVolatile(): Promise<void> {
    return this.#transfer.saveVolatile();
  }

  /** The state blob of `kind` in swtpm's CMD_GET_STATEBLOB format, or null (state-transfer.ts). */
  getStateBlob(kind: StateKind): Promise<Uint8Array | null> {
    return this.#transfer.get(kind);
  }

  /** Install a blob in swtpm's format while powered off; the next powerOn() starts from it (state-transfer.ts). */
  setStateBlob(kind: StateKind, blob: Uint8Array): Promise<void> {
    return this.#transfer.set(kind, blob);
  }

  /**
   * TPMLIB_SetBufferSize (swtpm CMD_SET_BUFFERSIZE): 0 queries; another size is clamped by libtpms to
   * [min, max] and may only change while the TPM is off. Commands above the size are refused.
   */
  setBufferSize(wanted: number): { size: number; min: number; max: number } {
    const lib = this.#requireLib();
    if (wanted !== 0 && this.#status === 'running') {
      throw new TpmInstanceError('RUNNING', this.instance, 'the buffer size can only change while the TPM is off');
    }
    const r = lib.setBufferSize(wanted);
    this.#bufferSize = r.size;
    return r;
  }

  /** TPMLIB_GetInfo (swtpm CMD_GET_INFO): libtpms' JSON for the given flags. */
  info(flags: number): string {
    return this.#requireLib().getInfo(flags);
  }

  /** The nvram name libtpms uses for a kind (permall, volatilestate, savestate). */
  static nvramName(kind: StateKind): string {
    return NVRAM_NAME[kind];
  }

  /**
   * Power off and unload the library copy. The durable state stays unless deleteState is set.
   * Queued commands submitted earlier still run first.
   */
  destroy(opts: { deleteState?: boolean } = {}): Promise<void> {
    return this.#enqueue(async () => {
      if (this.#status === 'destroyed') return;
      const lib = this.#lib;
      // An unbound spare's state belongs to no instance: it is dropped, never stored.
      if (this.#spare) this.#nv.dropPending();
      if (lib && this.#status === 'running') await this.#inLibrary(() => lib.terminateAsync());
      // Running or off (never failed): what is pending, power-off's included, is made durable.
      if (lib && this.#status !== 'failed') await this.#flush().catch(() => undefined);
      lib?.unload();
      this.#lib = null;
      this.#status = 'destroyed';
      if (opts.deleteState && !this.#spare) for (const kind of STATE_KINDS) await this.store.delete(this.instance, kind);
    });
  }
}
