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
