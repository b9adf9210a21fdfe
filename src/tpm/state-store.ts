// The boundary between a vTPM instance and whoever keeps its state durable: the manager over FIFOs in
// production (src/manager), a directory in tests. The engine releases a TPM response only after every
// store() it triggered has resolved, so "acknowledged" always means "durable".

/** The three blobs libtpms persists, named as swtpm names its state files and state blobs. */
export type StateKind = 'permanent' | 'volatile' | 'savestate';

export const STATE_KINDS: readonly StateKind[] = ['permanent', 'volatile', 'savestate'];

export interface StateStore {
  /** The last durable blob of that kind, or null when none was ever stored (a new TPM). */
  load(instance: number, kind: StateKind): Promise<Uint8Array | null>;
  /** Resolves only once the blob survives a crash of the store's process and of the host's page cache. */
  store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void>;
  /** Removes the blob; resolves once the removal is durable. Removing a missing blob is not an error. */
  delete(instance: number, kind: StateKind): Promise<void>;
}

/**
 * A store that can also hold a volatile checkpoint in its own process's memory, acknowledged before it
 * is durable (the manager's HOLD_VOLATILE): enough for state that must survive one process crash, not
 * power loss. It keeps the latest held blob per instance and holds it again if its peer restarts.
 */
export interface VolatileHolder {
  holdVolatile(instance: number, blob: Uint8Array): Promise<void>;
  /** Append bytes to the held checkpoint (it stays one blob at the manager). */
  appendVolatile(instance: number, bytes: Uint8Array): Promise<void>;
  /** Whether held checkpoints survive the peer's restart here (it can reconnect and hold them again). */
  readonly canHold: boolean;
  /** A checkpoint just loaded from the peer: hold it here too (see ManagerClient.adoptHeld). */
  adoptHeld(instance: number, blob: Uint8Array): void;
  /** Resolves once no holding-again after a peer restart is under way (its failure included); null: none is. */
  settled(): Promise<void> | null;
}

/** A spare's store until it is bound: it has no state, and must never be written to. */
export const SPARE_STORE: StateStore = {
  load: async () => null,
  store: async () => {
    throw new Error('a spare TPM has no store');
  },
  delete: async () => {
    throw new Error('a spare TPM has no store');
  },
};
