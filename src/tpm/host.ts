// The engine's front door: creates TPM instances (one private libtpms copy each) that share one bound on
// concurrently running libtpms calls, and keeps track of them by instance number.
import { Limiter } from './limiter.js';
import { TpmInstance, type InstanceOptions } from './instance.js';
import { tpmConcurrency } from './threadpool.js';

export interface CreateOptions extends InstanceOptions {
  /** Power on right away (default true). Off is for installing state blobs before the first power-on. */
  powerOn?: boolean;
  /** After power-on, also send TPM(2)_Startup of this type (default: none; the guest sends it). */
  startup?: 'clear' | 'state';
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

export class TpmHost {
  readonly limiter: Limiter;
  readonly #instances = new Map<number, TpmInstance>();

  constructor(opts: { maxConcurrent?: number } = {}) {
    this.limiter = new Limiter(opts.maxConcurrent ?? tpmConcurrency());
  }

  /** A new instance; its state comes from (and goes to) opts.store under opts.instance. */
  async create(opts: CreateOptions): Promise<TpmInstance> {
    const existing = this.#instances.get(opts.instance);
    if (existing && existing.status !== 'destroyed') {
      throw new TpmHostError('DUPLICATE', `instance ${opts.instance} already exists in this host`);
    }
    const inst = TpmInstance.load(opts, this.limiter);
    this.#instances.set(opts.instance, inst);
    try {
      if (opts.powerOn ?? true) {
        await inst.powerOn();
        if (opts.startup) {
          const rc = await inst.startup(opts.startup);
          if (rc !== 0) throw new TpmHostError('STARTUP', `vTPM ${opts.instance}: Startup returned 0x${rc.toString(16)}`);
        }
      }
    } catch (err) {
      await inst.destroy().catch(() => undefined);
      this.#instances.delete(opts.instance);
      throw err;
    }
    return inst;
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

  async destroyAll(): Promise<void> {
    const all = [...this.#instances.values()];
    this.#instances.clear();
    await Promise.all(all.map((i) => i.destroy()));
  }
}
