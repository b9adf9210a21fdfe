// The background writer of held volatile checkpoints (held-volatile.ts): a checkpoint the store does
// not hold yet is sealed and saved whole; one it holds gets only the bytes appended since, sealed as a
// piece of their own and appended to the stored blob (docs/manager-storage.md, "Appended pieces").
import type { HeldWriter } from './held-volatile.js';
import type { Sealer } from './seal.js';
import { StoreError } from './store-meta.js';
import type { VmRecord } from './vm-table.js';
import type { VtpmStore } from './vm-store.js';

/** Pieces after one whole write, then the next is whole: a load opens at most this many, whatever a client appends. */
export const MAX_PIECES = 64;

export function heldWriter(vmOf: (instance: number) => VmRecord | undefined, store: VtpmStore, sealer: Sealer): HeldWriter {
  return async (instance, data, stored, current) => {
    const vm = vmOf(instance);
    // A VM closed, deleted or migrated out meanwhile: what it held went with that step.
    if (vm?.status !== 'open') return null;
    if (stored && store.append && data.length > stored.end && stored.pieces < MAX_PIECES) {
      const generation = store.reserve();
      const piece = sealer.sealPiece(
        { instance, vmUuid: vm.vmUuid, base: stored.base, previous: stored.generation, offset: stored.end, generation },
        data.subarray(stored.end),
      );
      try {
        await store.append(instance, 'volatile', stored.generation, generation, piece);
        return { base: stored.base, generation, end: data.length, pieces: stored.pieces + 1 };
      } catch (err) {
        if (!(err instanceof StoreError && err.code === 'STALE')) throw err;
      }
      // The stored blob moved on or left the store's memory. Written whole only if still held: a durable
      // save or delete that replaced it was ordered after the piece, and must not be overwritten.
      if (!current()) return null;
    }
    const generation = store.reserve();
    await store.save(instance, 'volatile', generation, sealer.seal({ instance, vmUuid: vm.vmUuid, kind: 'volatile', generation }, data));
    return { base: generation, generation, end: data.length, pieces: 0 };
  };
}
