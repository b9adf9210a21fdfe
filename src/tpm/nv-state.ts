// What libtpms wrote, and making it durable: the NV callbacks of one library copy capture every write
// and delete into memory (loaddata serves from there), and flush() applies them to the StateStore in
// order, one chain per instance, so waiting for the newest flush waits for every earlier one.
import { TPM_SUCCESS, type LibtpmsCallbacks } from '../../native/libtpms.js';
import { kindForNvramName } from './state-blob.js';
import { STATE_KINDS, type StateKind, type StateStore } from './state-store.js';

/** Where a flush writes and whom it blames; read at each flush (a bound spare changes both). */
export interface NvTarget {
  readonly store: StateStore;
  readonly instance: number;
}

export class NvState {
  /** What libtpms last wrote (or what the store held at power-on): loaddata serves from here. */
  #nv = new Map<StateKind, Uint8Array>();
  /** Writes (blob) and deletes (null) not yet durable, in order of first occurrence. */
  #pending = new Map<StateKind, Uint8Array | null>();
  /** The newest flush (see flush). */
  #flushing: Promise<void> = Promise.resolve();
  /** #flushing once it fulfilled: every change captured before it is durable and none failed. */
  #fulfilled: Promise<void> | null = this.#flushing;
  /**
   * True once memory holds every kind the store holds (a sync read them) and only this object has
   * written the store since: a restore (a new permanent state set while off) then starts at once.
   */
  #mirrored = false;

  /** @param onStoreFailure called with the message when a store write or delete fails; the flush then rejects. */
  constructor(
    private readonly target: NvTarget,
    private readonly onStoreFailure: (message: string) => Error,
  ) {}

  /** libtpms' NV callbacks (loaddata, storedata, deletename) over this state. */
  callbacks(): Pick<LibtpmsCallbacks, 'loadData' | 'storeData' | 'deleteName'> {
    return {
      loadData: (name) => {
        const kind = kindForNvramName(name);
        return kind ? (this.#nv.get(kind) ?? null) : null;
      },
      storeData: (name, data) => {
        const kind = kindForNvramName(name);
        if (!kind) return 9; // TPM_FAIL: a name libtpms 0.9 never uses
        this.put(kind, data);
        return TPM_SUCCESS;
      },
      deleteName: (name) => {
        const kind = kindForNvramName(name);
        if (kind) this.put(kind, null);
        return TPM_SUCCESS;
      },
    };
  }

  get(kind: StateKind): Uint8Array | undefined {
    return this.#nv.get(kind);
  }

  has(kind: StateKind): boolean {
    return this.#nv.has(kind);
  }

  /** A write (blob) or delete (null) of `kind`, in memory now and durable at the next flush. */
  put(kind: StateKind, blob: Uint8Array | null): void {
    if (blob) this.#nv.set(kind, blob);
    else this.#nv.delete(kind);
    this.#pending.set(kind, blob);
  }

  /** Forget what is not durable yet (a failed MainInit, an unbound spare). */
  dropPending(): void {
    this.#pending.clear();
    // Memory may now be ahead of the store: the next power-on reads the store again.
    this.#mirrored = false;
  }

  /** Writes not yet durable. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /**
   * Make what is pending durable and memory a mirror of the store (power-on): the kinds pending now are
   * written, every other kind is read back, both at once. `ready`: memory is complete (libtpms may start
   * on it); `durable`: the store holds what was pending. So TPMLIB_MainInit runs while the blobs set with
   * setStateBlob are committed, in one batch. A restore (permanent state among them) on memory that
   * mirrors the store reads nothing back: no store round trip precedes MainInit. Any other power-on
   * reads the store again, so a reset still meets whatever the store holds (damage included).
   */
  sync(): { ready: Promise<void>; durable: Promise<void> } {
    const written = new Set(this.#pending.keys());
    // Reads wait for earlier writes; this flush's writes are of other kinds, so they run alongside.
    const prior = this.#flushing.catch(() => undefined);
    // What is pending now, not what power-on writes meanwhile: that stays pending, promised to nobody
    // yet, and goes out with the first response.
    const ops = [...this.#pending];
    this.#pending.clear();
    const durable = this.#flushing.then(() => this.#write(ops)); // a failed earlier flush fails this one too
    this.#link(durable);
    // A caller that only needs `ready` may leave it: a failure has failed the instance already.
    durable.catch(() => undefined);
    const skipRead = this.#mirrored && written.has('permanent');
    const ready = prior.then(async () => {
      if (skipRead) return;
      const rest = STATE_KINDS.filter((k) => !written.has(k));
      const { store, instance } = this.target;
      const blobs = await Promise.all(rest.map((kind) => store.load(instance, kind)));
      rest.forEach((kind, i) => {
        const blob = blobs[i];
        if (blob) this.#nv.set(kind, blob);
        else this.#nv.delete(kind);
      });
      this.#mirrored = true;
    });
    return { ready, durable };
  }

  /**
   * Make every captured change durable, in order. Flushes form a chain: each starts after the one
   * before it, so waiting for the newest waits for all (a failed one fails every later one, until
   * settle()).
   */
  flush(): Promise<void> {
    // Most commands write no NV: nothing to add to the chain, and its newest link already waits for all.
    if (this.#pending.size === 0) return this.#flushing;
    const p = this.#flushing.then(() => this.#flushPending());
    this.#link(p);
    return p;
  }

  /** `p` becomes the chain's newest link; the chain is idle again once it fulfils while still newest. */
  #link(p: Promise<void>): void {
    this.#flushing = p;
    p.then(
      () => {
        if (this.#flushing === p) this.#fulfilled = p;
      },
      () => undefined,
    );
  }

  /** Nothing captured waits to be written and every write made durable: a response may go out at once. */
  get idle(): boolean {
    return this.#pending.size === 0 && this.#fulfilled === this.#flushing;
  }

  /** Wait for whatever is still being written, ignore its outcome, and start a fresh chain. */
  async settle(): Promise<void> {
    await this.#flushing.catch(() => undefined);
    this.#flushing = Promise.resolve();
    this.#fulfilled = this.#flushing;
  }

  async #flushPending(): Promise<void> {
    while (this.#pending.size > 0) {
      const ops = [...this.#pending];
      this.#pending.clear();
      await this.#write(ops);
    }
  }

  /** One batch of writes: one kind each, so they go out together (the manager commits them with one fsync). */
  async #write(ops: Array<[StateKind, Uint8Array | null]>): Promise<void> {
    const { store, instance } = this.target;
    const done = await Promise.allSettled(ops.map(([kind, blob]) => (blob ? store.store(instance, kind, blob) : store.delete(instance, kind))));
    const i = done.findIndex((d) => d.status === 'rejected');
    if (i >= 0) {
      const err: unknown = (done[i] as PromiseRejectedResult).reason;
      throw this.onStoreFailure(`state store failed on ${ops[i]![0]}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}
