// The exactly-once table of one vTPM: which ring request ids completed and what they were answered.
// It travels inside the vTPM's volatile-state blob at the manager, so "the TPM ran request N" and "the
// answer to N is R" are held in one checkpoint: a backend that dies between running a command and
// checkpointing it rolls back to the state before the command, and a resubmitted id runs again exactly
// once; one that dies after finds the id and returns the stored answer without running anything.
//
// A checkpoint is either full (the libtpms volatile blob with the table) or a full one followed by
// replay records: commands whose effect on volatile state is deterministic (PCR_Extend), appended at
// the manager instead of a new full copy, and run again on the restored TPM before it serves.
//
// Blob layout (all little-endian): magic "VTJ2", count u32, per entry {id u64, status u32, length u32,
// bytes}, volatile length u32, the libtpms volatile blob (possibly empty), then replay records to the
// end: {id u64, locality u8, status u32, command length u32, command, response length u32, response}.
// "VTJ1" blobs (no volatile length: the libtpms blob runs to the end, no records) still load.
import type { StateKind, StateStore, VolatileHolder } from '../tpm/state-store.js';
import type { Completed } from '../tpm/vtpm.js';

const MAGIC_V1 = 0x314a5456; // "VTJ1"
const MAGIC_V2 = 0x324a5456; // "VTJ2"
/** Completed ids kept: twice the ring's 32 slots, so every request a frontend can still resubmit is here. */
export const JOURNAL_WINDOW = 64;
/** Replay records a loaded checkpoint may carry (what any backend version appends stays within it). */
export const MAX_REPLAY = 256;
/**
 * Replay records appended after one full checkpoint; then the next is full again. The manager writes
 * each guest's whole held checkpoint (full copy and records) every second, so the records' average
 * share of it is what this trades against one whole checkpoint (VolatileAll_Store and the table's
 * encoding) per REPLAY_PER_FULL extends.
 */
export const REPLAY_PER_FULL = 64;
const MAX_RESPONSE = 12 * 4096;

export class JournalError extends Error {
  readonly code = 'EJOURNAL';
  constructor(instance: number, message: string) {
    super(`vTPM instance ${instance}: exactly-once table: ${message}`);
    this.name = 'JournalError';
  }
}

/** A completed command whose effect a restored TPM gets by running it again. */
export interface ReplayRecord {
  id: bigint;
  locality: number;
  status: number;
  command: Uint8Array;
  response: Uint8Array;
}

/**
 * A StateStore in front of the manager for one instance: passes permanent/savestate through, and
 * wraps volatile state with the completed-request table.
 */
export class JournalStore implements StateStore {
  readonly #inner: StateStore & Partial<VolatileHolder>;
  readonly #instance: number;
  readonly #done = new Map<bigint, Completed>();
  /** The highest id ever completed: an id at or below it that is not in the table is too old to answer. */
  #high = 0n;
  /** Volatile stores go to the manager's memory (HOLD_VOLATILE) while set, if the store can hold. */
  #holding = false;
  /** The last volatile store was made durable (not only held). */
  #durable = true;
  /** Replay records appended at the manager since the last full checkpoint; -1: no held base to append to. */
  #appended = -1;
  /** Records the last load found, for the restored TPM to run again. */
  #replay: ReplayRecord[] = [];
  #loadedVolatile = false;

  constructor(inner: StateStore & Partial<VolatileHolder>, instance: number) {
    this.#inner = inner;
    this.#instance = instance;
  }

  get highestCompleted(): bigint {
    return this.#high;
  }

  get(id: bigint): Completed | undefined {
    // Every id in the table is at or below #high, and a new request's id is above it: no hashing then.
    return id > this.#high ? undefined : this.#done.get(id);
  }

  /** Remember a completion in memory; the next checkpoint holds it. */
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

  /** Whether the last load restored volatile state (the DRBG must then be stirred). */
  get loadedVolatile(): boolean {
    return this.#loadedVolatile;
  }

  /** The replay records of the last load, handed over once. */
  takeReplay(): ReplayRecord[] {
    const r = this.#replay;
    this.#replay = [];
    return r;
  }

  async load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    const blob = await this.#inner.load(instance, kind);
    if (kind !== 'volatile') return blob;
    this.reset();
    this.#replay = [];
    this.#loadedVolatile = false;
    // What the manager has may differ from what we last held (a restart): append only after a full one.
    this.#appended = -1;
    if (!blob) return null;
    this.#inner.adoptHeld?.(instance, blob);
    const inner = this.#decode(blob);
    this.#loadedVolatile = inner.length > 0;
    return inner.length ? inner : null;
  }

  /** Whether `holding` stores are held rather than made durable (the store can hold them again after its peer restarts). */
  get canHold(): boolean {
    return this.#inner.canHold === true && typeof this.#inner.holdVolatile === 'function';
  }

  get volatileDurable(): boolean {
    return this.#durable;
  }

  /** Resolves once the store holds our checkpoints again after its restart; null when it is not doing that. */
  settled(): Promise<void> | null {
    return this.#inner.settled?.() ?? null;
  }

  /** `n` more replay records can go after the held checkpoint (else the next one must be full). */
  canAppend(n: number): boolean {
    return this.canHold && typeof this.#inner.appendVolatile === 'function' && this.#appended >= 0 && this.#appended + n <= REPLAY_PER_FULL;
  }

  /** Run `save` (a TPMLIB_VolatileAll_Store) with its volatile store held, not made durable. */
  async holding<T>(save: () => Promise<T>): Promise<T> {
    this.#holding = this.canHold;
    try {
      return await save();
    } finally {
      this.#holding = false;
    }
  }

  /** Hold `records` after the held checkpoint at the manager (they are in the table already). */
  append(records: ReplayRecord[]): Promise<void> {
    const n = this.#appended;
    this.#appended = -1; // unknown until the manager answers
    this.#durable = false;
    return this.#inner.appendVolatile!(this.#instance, encodeRecords(records)).then(() => {
      this.#appended = n + records.length;
    });
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    if (kind !== 'volatile') return this.#inner.store(instance, kind, blob);
    const wrapped = this.#encode(blob);
    this.#appended = -1;
    if (this.#holding) {
      this.#durable = false;
      await this.#inner.holdVolatile!(instance, wrapped);
      this.#appended = 0;
      return;
    }
    await this.#inner.store(instance, kind, wrapped);
    this.#durable = true;
  }

  async delete(instance: number, kind: StateKind): Promise<void> {
    // libtpms consumes volatile state at power-on and the engine then deletes it; with a checkpoint
    // after every command (ring requests recorded here), the last checkpoint is exactly what a restart
    // must resume, so keep it. Without (v2 devices), a stale volatile blob must not outlive its use.
    if (kind === 'volatile' && this.#high > 0n) return;
    await this.#inner.delete(instance, kind);
  }

  #encode(volatile: Uint8Array): Uint8Array {
    let size = 12;
    for (const c of this.#done.values()) size += 16 + c.response.length;
    const out = Buffer.alloc(size + volatile.length);
    out.writeUInt32LE(MAGIC_V2, 0);
    out.writeUInt32LE(this.#done.size, 4);
    let off = 8;
    for (const [id, c] of this.#done) {
      out.writeBigUInt64LE(id, off);
      out.writeUInt32LE(c.status, off + 8);
      out.writeUInt32LE(c.response.length, off + 12);
      out.set(c.response, off + 16);
      off += 16 + c.response.length;
    }
    out.writeUInt32LE(volatile.length, off);
    out.set(volatile, off + 4);
    return out;
  }

  #decode(blob: Uint8Array): Uint8Array {
    const b = Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
    // A blob without our magic is plain libtpms volatile state (saved before journaling was on).
    const magic = b.length >= 8 ? b.readUInt32LE(0) : 0;
    if (magic !== MAGIC_V1 && magic !== MAGIC_V2) return blob;
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
    if (magic === MAGIC_V1) return new Uint8Array(b.subarray(off));
    if (off + 4 > b.length) throw new JournalError(this.#instance, `volatile length truncated at byte ${off}`);
    const vlen = b.readUInt32LE(off);
    if (off + 4 + vlen > b.length) throw new JournalError(this.#instance, `volatile blob claims ${vlen} bytes, ${b.length - off - 4} left`);
    const volatile = new Uint8Array(b.subarray(off + 4, off + 4 + vlen));
    off += 4 + vlen;
    const replay: ReplayRecord[] = [];
    while (off < b.length) {
      const r = decodeRecord(b, off, replay.length, this.#instance);
      replay.push(r.record);
      off = r.next;
      if (replay.length > MAX_REPLAY) throw new JournalError(this.#instance, `more than ${MAX_REPLAY} replay records`);
      if (r.record.id > this.#high) this.#high = r.record.id;
    }
    this.#replay = replay;
    return volatile;
  }
}

function encodeRecords(records: ReplayRecord[]): Uint8Array {
  let size = 0;
  for (const r of records) size += 17 + r.command.length + 4 + r.response.length;
  const out = Buffer.allocUnsafe(size); // every byte is written below; small ones come from Node's pool
  let off = 0;
  for (const r of records) {
    out.writeBigUInt64LE(r.id, off);
    out.writeUInt8(r.locality, off + 8);
    out.writeUInt32LE(r.status, off + 9);
    out.writeUInt32LE(r.command.length, off + 13);
    out.set(r.command, off + 17);
    off += 17 + r.command.length;
    out.writeUInt32LE(r.response.length, off);
    out.set(r.response, off + 4);
    off += 4 + r.response.length;
  }
  return out;
}

function decodeRecord(b: Buffer, off: number, i: number, instance: number): { record: ReplayRecord; next: number } {
  const bad = (what: string): never => {
    throw new JournalError(instance, `replay record ${i} at byte ${off}: ${what}`);
  };
  if (off + 17 > b.length) bad('header truncated');
  const clen = b.readUInt32LE(off + 13);
  if (clen > MAX_RESPONSE || off + 17 + clen + 4 > b.length) bad(`command claims ${clen} bytes`);
  const roff = off + 17 + clen;
  const rlen = b.readUInt32LE(roff);
  if (rlen > MAX_RESPONSE || roff + 4 + rlen > b.length) bad(`response claims ${rlen} bytes`);
  return {
    record: {
      id: b.readBigUInt64LE(off),
      locality: b.readUInt8(off + 8),
      status: b.readUInt32LE(off + 9),
      command: new Uint8Array(b.subarray(off + 17, off + 17 + clen)),
      response: new Uint8Array(b.subarray(roff + 4, roff + 4 + rlen)),
    },
    next: roff + 4 + rlen,
  };
}
