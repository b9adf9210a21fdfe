// The exactly-once table of one vTPM: which ring request ids completed and what they were answered.
// It travels inside the vTPM's volatile-state blob at the manager, so "the TPM ran request N" and "the
// answer to N is R" become durable in one store: a backend that dies between running a command and
// checkpointing it rolls back to the state before the command, and a resubmitted id runs again exactly
// once; one that dies after finds the id and returns the stored answer without running anything.
//
// Blob layout (all little-endian): magic "VTJ1", count u32, then per entry {id u64, status u32,
// length u32, bytes}, then the libtpms volatile blob (possibly empty) to the end.
import type { StateKind, StateStore } from '../tpm/state-store.js';
import type { Completed } from '../tpm/vtpm.js';

const MAGIC = 0x314a5456; // "VTJ1"
/** Completed ids kept: twice the ring's 32 slots, so every request a frontend can still resubmit is here. */
export const JOURNAL_WINDOW = 64;
const MAX_RESPONSE = 12 * 4096;

export class JournalError extends Error {
  readonly code = 'EJOURNAL';
  constructor(instance: number, message: string) {
    super(`vTPM instance ${instance}: exactly-once table: ${message}`);
    this.name = 'JournalError';
  }
}

export type { Completed };

/**
 * A StateStore in front of the manager for one instance: passes permanent/savestate through, and
 * wraps volatile state with the completed-request table.
 */
export class JournalStore implements StateStore {
  readonly #inner: StateStore;
  readonly #instance: number;
  readonly #done = new Map<bigint, Completed>();
  /** The highest id ever completed: an id at or below it that is not in the table is too old to answer. */
  #high = 0n;

  constructor(inner: StateStore, instance: number) {
    this.#inner = inner;
    this.#instance = instance;
  }

  get highestCompleted(): bigint {
    return this.#high;
  }

  get(id: bigint): Completed | undefined {
    return this.#done.get(id);
  }

  /** Remember a completion in memory; the next volatile store makes it durable. */
  record(id: bigint, c: Completed): void {
    this.#done.set(id, c);
    if (id > this.#high) this.#high = id;
    while (this.#done.size > JOURNAL_WINDOW) this.#done.delete(this.#done.keys().next().value as bigint);
  }

  /** A fresh boot of the vTPM (not a resume): ids start over. */
  reset(): void {
    this.#done.clear();
    this.#high = 0n;
  }

  async load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    const blob = await this.#inner.load(instance, kind);
    if (kind !== 'volatile') return blob;
    this.reset();
    if (!blob) return null;
    const inner = this.#decode(blob);
    return inner.length ? inner : null;
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    await this.#inner.store(instance, kind, kind === 'volatile' ? this.#encode(blob) : blob);
  }

  async delete(instance: number, kind: StateKind): Promise<void> {
    // libtpms consumes volatile state at power-on and the engine then deletes it; with a checkpoint
    // after every command (ring requests recorded here), the last checkpoint is exactly what a restart
    // must resume, so keep it. Without (v2 devices), a stale volatile blob must not outlive its use.
    if (kind === 'volatile' && this.#high > 0n) return;
    await this.#inner.delete(instance, kind);
  }

  #encode(volatile: Uint8Array): Uint8Array {
    let size = 8;
    for (const c of this.#done.values()) size += 16 + c.response.length;
    const out = Buffer.alloc(size + volatile.length);
    out.writeUInt32LE(MAGIC, 0);
    out.writeUInt32LE(this.#done.size, 4);
    let off = 8;
    for (const [id, c] of this.#done) {
      out.writeBigUInt64LE(id, off);
      out.writeUInt32LE(c.status, off + 8);
      out.writeUInt32LE(c.response.length, off + 12);
      out.set(c.response, off + 16);
      off += 16 + c.response.length;
    }
    out.set(volatile, off);
    return out;
  }

  #decode(blob: Uint8Array): Uint8Array {
    const b = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
    // A blob without our magic is plain libtpms volatile state (saved before journaling was on).
    if (b.length < 8 || b.readUInt32LE(0) !== MAGIC) return blob;
    const count = b.readUInt32LE(4);
    if (count > JOURNAL_WINDOW) throw new JournalError(this.#instance, `${count} entries exceed the window of ${JOURNAL_WINDOW}`);
    let off = 8;
    for (let i = 0; i < count; i++) {
      if (off + 16 > b.length) throw new JournalError(this.#instance, `entry ${i} truncated at byte ${off}`);
      const id = b.readBigUInt64LE(off);
      const status = b.readUInt32LE(off + 8);
      const length = b.readUInt32LE(off + 12);
      if (length > MAX_RESPONSE || off + 16 + length > b.length) {
        throw new JournalError(this.#instance, `entry ${i} (id ${id}) claims ${length} response bytes, ${b.length - off - 16} left`);
      }
      this.record(id, { status, response: new Uint8Array(b.subarray(off + 16, off + 16 + length)) });
      off += 16 + length;
    }
    return new Uint8Array(b.subarray(off));
  }
}
