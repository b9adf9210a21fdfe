// The engine's front door: creates TPM instances (one private libtpms copy each) that share one bound on
// concurrently running libtpms calls, and keeps track of them by instance number. It may also keep
// spare TPMs, manufactured ahead of time, so that a new instance is ready sooner (see HostOptions).
import { Limiter } from './limiter.js';
import { TpmInstance, type TpmVersion } from './instance.js';
import { DEFAULT_BUFFER_SIZE, type InstanceOptions } from './instance-types.js';
import { STATE_KINDS } from './state-store.js';
import { tpmConcurrency } from './threadpool.js';

export interface CreateOptions extends InstanceOptions {
  /** Power on right away (default true). Off is for installing state blobs before the first power-on. */
  powerOn?: boolean;
  /** After power-on, also send TPM(2)_Startup of this type (default: none; the guest sends it). */
  startup?: 'clear' | 'state';
}

export interface HostOptions {
  /** Bound on libtpms calls running at once (default: thread pool size − 2, see threadpool.ts). */
  maxConcurrent?: number;
  /**
   * Spare TPMs to keep manufactured: a number is that many TPM 2.0 spares; per version otherwise
   * (`{ '2.0': 2, '1.2': 1 }`). Default 0. create() of an instance whose store holds no state at all
   * takes a spare instead of manufacturing on demand (2.0: ~2 ms less; 1.2, whose manufacture makes
   * RSA keys: 100–400 ms less); the host makes a new one when it is idle. Each spare costs one
   * library copy's memory (~0.3 MiB PSS) until it is used or destroyAll() drops it.
   */
  spares?: number | Partial<Record<TpmVersion, number>>;
}

export class TpmHostError extends Error {
  constructor(
    readonly code: 'DUPLICATE' | 'STARTUP',
    message: string,
  ) {
    super(message);
    this.name = 'TpmHostError';
  }
}

const VERSIONS: readonly TpmVersion[] = ['2.0', '1.2'];
/** How long a refill waits for the host to go idle before it goes ahead anyway. */
const REFILL_MAX_DEFER_MS = 50;
const REFILL_POLL_MS = 2;

export class TpmHost {
  readonly limiter: Limiter;
  readonly #instances = new Map<number, TpmInstance>();
  /** Instance numbers whose create() is under way (reserved before its first await). */
  readonly #creating = new Set<number>();
  readonly #spareTarget: Record<TpmVersion, number>;
  readonly #spares: Record<TpmVersion, TpmInstance[]> = { '2.0': [], '1.2': [] };
  /** The one manufacture under way, if any (refills make one spare at a time). */
  #refilling: Promise<void> | null = null;
  #refillScheduled = false;
  #closed = false;

  constructor(opts: HostOptions = {}) {
    this.limiter = new Limiter(opts.maxConcurrent ?? tpmConcurrency());
    const s = opts.spares ?? 0;
    const per = typeof s === 'number' ? { '2.0': s } : s;
    this.#spareTarget = { '2.0': per['2.0'] ?? 0, '1.2': per['1.2'] ?? 0 };
    for (const v of VERSIONS) {
      const n = this.#spareTarget[v];
      if (!Number.isInteger(n) || n < 0) throw new RangeError(`bad spares count ${n} for TPM ${v}`);
    }
    this.#scheduleRefill();
  }

  /** A new instance; its state comes from (and goes to) opts.store under opts.instance. */
  async create(opts: CreateOptions): Promise<TpmInstance> {
    const existing = this.#instances.get(opts.instance);
    if ((existing && existing.status !== 'destroyed') || this.#creating.has(opts.instance)) {
      throw new TpmHostError('DUPLICATE', `instance ${opts.instance} already exists in this host`);
    }
    this.#creating.add(opts.instance);
    let inst: TpmInstance | null = null;
    try {
      inst = await this.#takeSpare(opts);
      if (!inst) {
        inst = TpmInstance.load(opts, this.limiter);
        if (opts.powerOn ?? true) await inst.powerOn();
      }
      this.#instances.set(opts.instance, inst);
      if (opts.startup) {
        // Nobody sees this response but us, so its state write need not finish before create()
        // resolves, only before the instance's first released response (startupUnreleased).
        const rc = await inst.startupUnreleased(opts.startup);
        if (rc !== 0) throw new TpmHostError('STARTUP', `vTPM ${opts.instance}: Startup returned 0x${rc.toString(16)}`);
      }
    } catch (err) {
      if (inst) {
        await inst.destroy().catch(() => undefined);
        if (this.#instances.get(opts.instance) === inst) this.#instances.delete(opts.instance);
      }
      throw err;
    } finally {
      this.#creating.delete(opts.instance);
      this.#scheduleRefill();
    }
    return inst;
  }

  /**
   * A spare bound to opts.instance, or null when none fits: none kept or left for the version, a
   * non-default buffer size, powerOn: false (state blobs go in first), or any state in the store (an
   * existing TPM is never replaced by a new one).
   */
  async #takeSpare(opts: CreateOptions): Promise<TpmInstance | null> {
    if (this.#closed || !(opts.powerOn ?? true)) return null;
    if ((opts.bufferSize ?? DEFAULT_BUFFER_SIZE) !== DEFAULT_BUFFER_SIZE) return null;
    const pool = this.#spares[opts.version] as TpmInstance[] | undefined; // undefined: a bad version, refused later
    if (!pool || pool.length === 0) return null;
    const held = await Promise.all(STATE_KINDS.map((kind) => opts.store.load(opts.instance, kind)));
    if (held.some((b) => b !== null)) return null;
    // Taken off the list synchronously: two creates can never get the same spare.
    const spare = pool.shift();
    if (!spare) return null;
    spare.bindSpare(opts);
    return spare;
  }

  /** Spares ready now, per version. */
  spareCount(version: TpmVersion = '2.0'): number {
    return this.#spares[version].length;
  }

  /** Resolves once every version's spares are at their target (or the host is shut down). */
  async sparesReady(): Promise<void> {
    for (;;) {
      if (this.#closed || VERSIONS.every((v) => this.#spares[v].length >= this.#spareTarget[v])) return;
      if (!this.#refilling) this.#scheduleRefill();
      await (this.#refilling ?? new Promise((r) => setTimeout(r, REFILL_POLL_MS)));
    }
  }

  /**
   * Refills run off the critical path: queued with setImmediate (so a create() that just resolved lets
   * its caller send the first command first), then deferred while any create() is under way or any
   * instance has work queued (a refill beside the first Startup slows it: Libtpms.load() holds the JS
   * thread ~0.6 ms and MainInit takes a core for ~2 ms), for at
   * most REFILL_MAX_DEFER_MS so a busy host still gets its spares.
   */
  #scheduleRefill(): void {
    if (this.#closed || this.#refillScheduled || this.#refilling || !this.#needsSpare()) return;
    this.#refillScheduled = true;
    const since = performance.now();
    const attempt = (): void => {
      if (this.#closed) {
        this.#refillScheduled = false;
        return;
      }
      const busy = this.#creating.size > 0 || this.limiter.running > 0 || this.#anyQueued();
      if (busy && performance.now() - since < REFILL_MAX_DEFER_MS) {
        setTimeout(attempt, REFILL_POLL_MS).unref();
        return;
      }
      this.#refillScheduled = false;
      this.#refilling = this.#refillOne().finally(() => {
        this.#refilling = null;
        this.#scheduleRefill();
      });
    };
    setImmediate(attempt);
  }

  /** Some instance has work queued or running (a command, or its store writes after libtpms returned). */
  #anyQueued(): boolean {
    for (const inst of this.#instances.values()) if (inst.queued > 0) return true;
    return false;
  }

  #needsSpare(): TpmVersion | null {
    return VERSIONS.find((v) => this.#spares[v].length < this.#spareTarget[v]) ?? null;
  }

  async #refillOne(): Promise<void> {
    const version = this.#needsSpare();
    if (!version) return;
    let spare: TpmInstance;
    try {
      spare = await TpmInstance.manufacture(version, this.limiter);
    } catch {
      // Manufacture failing is not transient (a broken libtpms): stop making spares of this version.
      // create() still works, manufacturing on demand, and reports that error itself.
      this.#spareTarget[version] = 0;
      return;
    }
    if (this.#closed) await spare.destroy();
    else this.#spares[version].push(spare);
  }

  get(instance: number): TpmInstance | undefined {
    return this.#instances.get(instance);
  }

  list(): TpmInstance[] {
    return [...this.#instances.values()].filter((i) => i.status !== 'destroyed');
  }

  async destroy(instance: number, opts: { deleteState?: boolean } = {}): Promise<void> {
    const inst = this.#instances.get(instance);
    if (!inst) return;
    this.#instances.delete(instance);
    await inst.destroy(opts);
  }

  /** Destroys every instance and every spare; the host makes no spares after this (create still works). */
  async destroyAll(): Promise<void> {
    this.#closed = true;
    const all = [...this.#instances.values(), ...VERSIONS.flatMap((v) => this.#spares[v].splice(0))];
    this.#instances.clear();
    await Promise.all([...all.map((i) => i.destroy()), this.#refilling]);
  }
}
