// What the manager daemon needs from a state store, whichever it is: the local group-commit store with
// its write-ahead log (store.ts, the embedded default) or a cluster's etcd (etcd-store.ts).
import type { StateKind } from '../tpm/state-store.js';
import type { StoreStats } from './store.js';

export interface VtpmStore {
  /** Where the state lives, for log lines ("dir:/var/lib/vtpm", "etcd://h:p,…"). */
  readonly description: string;
  readonly stats: StoreStats;
  /** The next generation (unique, increasing); the caller seals the blob under it, then save()s. */
  reserve(): number;
  /** Resolves once the sealed blob is durable (and will be what a load returns). */
  save(instance: number, kind: StateKind, generation: number, data: Uint8Array): Promise<void>;
  /**
   * Appends a sealed piece to the blob at generation `onto`, which becomes `generation` (store.ts);
   * absent where the store keeps whole saves only (etcd). Refused with StoreError STALE when it cannot.
   */
  append?(instance: number, kind: StateKind, onto: number, generation: number, data: Uint8Array): Promise<void>;
  remove(instance: number, kinds?: readonly StateKind[]): Promise<void>;
  /** Makes the current VM table (and migration record) durable. */
  commitTable(): Promise<void>;
  load(instance: number, kind: StateKind): Promise<{ generation: number; data: Buffer } | null>;
  flush(): Promise<void>;
  close(): Promise<void>;
}
