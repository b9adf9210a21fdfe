// The manager's durable state: sealed vTPM blobs plus one metadata record (VM table, expected blob
// generations), on a storage backend behind a small ops table (store-ops.ts; metadata codec in
// store-meta.ts). This file is the group commit and the checkpoints.
//
// Two layers. A checkpoint is the state as files: one file per blob under a never-reused generation
// name plus the metadata naming them, written crash-safely (temp file, fdatasync, rename, directory
// fsync, then the same for the metadata, superseded files removed only after). Between checkpoints,
// each group commit appends ONE record to the write-ahead log (wal.ts) — the batch's sealed blobs, its
// removals, the table if it changed — with one pwrite + one fdatasync, and is acknowledged then. The
// log file is written full of zeros when created, so an append overwrites allocated blocks and the
// fdatasync has no file-system metadata to commit (size and block map never change).
// Checkpoint: the current state goes out as files and the metadata names the next log generation;
// records of earlier generations left in the file are then ignored by replay. Generation g is appended
// to half g % 2 of the log file, so when a half fills, appends move on to the other half at once and
// the generation just closed is checkpointed in the background (off the commit path); only if that
// half fills too before the checkpoint is durable does a commit wait for it. At every start, at clean
// shutdown and after a failed append the checkpoint is taken in line instead.
// Start: load the checkpoint, replay the log records of the generation it names and of the one after,
// in order, up to the first torn/invalid/out-of-sequence one, then checkpoint (the replayed state
// becomes files, the log generation moves on past both) and remove every blob file the new metadata
// does not name.
// Loads come from memory for blobs saved since the last checkpoint (the log keeps that view current),
// else from the blob files. A volatile blob also grows by sealed pieces (append()), one log entry each
// applied onto the generation it names; a checkpoint writes the blob and its pieces as one file (chain.ts).
import crypto from 'node:crypto';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { StoreError, blobKey, blobName, decodeMeta, encodeMeta, nameOf, type MetaRecord } from './store-meta.js';
import type { StoreOps } from './store-ops.js';
import { managerMetrics } from '../util/metrics.js';
import type { VtpmStore } from './vm-store.js';
import { DEFAULT_WAL_BYTES, encodeRecord, walKey, type AppendLog, type WalAppend, type WalRecord } from './wal.js';
import { applyRecord, inMemory, materialize, observeCommit, replayLog, type Dirty, type View } from './store-view.js';

/** How long a commit waits for stragglers when the previous one was shared (see #gather). */
const GATHER_MS = 5;
/** How far each start advances the generation clock (far more than one run reserves between commits). */
export const CLOCK_JUMP = 2 ** 24;

type Op =
  | { type: 'save'; instance: number; kind: StateKind; generation: number; data: Uint8Array; done: Deferred }
  | { type: 'remove'; instance: number; kinds: readonly StateKind[]; done: Deferred }
  | { type: 'append'; instance: number; kind: StateKind; onto: number; generation: number; data: Uint8Array; done: Deferred }
  | { type: 'meta'; done: Deferred }
  | { type: 'checkpoint'; done: Deferred };

type OpInput = Op extends infer T ? (T extends Op ? Omit<T, 'done'> : never) : never;

interface Deferred {
  resolve: () => void;
  reject: (e: Error) => void;
}

export interface StoreStats {
  /** Group commits, whichever way they went (log record or checkpoint). */
  commits: number;
  saves: number;
  /** Saves superseded inside their batch by a newer save of the same blob (written never). */
  coalesced: number;
  /** Commits that went out as files + metadata (log full, start, shutdown, after a log failure). */
  checkpoints: number;
  /** Log records replayed at open. */
  replayed: number;
  appends?: number; // pieces appended to blobs (append())
}

export interface StoreOptions {
  /** Size of the log file; a record that does not fit makes its batch a checkpoint. */
  logBytes?: number;
  /**
   * How a record is appended. 'sync' (default): pwrite + fdatasync on the manager's thread. It blocks
   * the event loop for the ~0.2–0.6 ms of the fdatasync, while requests queue in the FIFOs and form the
   * next group; 'async' runs both on the libuv threadpool (two thread hand-offs and wake-ups per commit,
   * the loop free to read and seal meanwhile). Sync is the default: the hand-offs cost more than the
   * loop gains while it waits (docs/benchmarks.md, manager).
   */
  append?: 'sync' | 'async';
}

/** How many distinct savers a batch and the queue behind it represent (other operations count once each). */
function expected(batch: readonly Op[], queue: readonly Op[]): number {
  const keys = new Set<string>();
  let other = 0;
  for (const op of [...batch, ...queue]) {
    if (op.type === 'save' || op.type === 'append') keys.add(blobKey(op.instance, op.kind));
    else other++;
  }
  return keys.size + other;
}

export class GroupCommitStore implements VtpmStore {
  #ck: MetaRecord; // the last durable checkpoint: its blobs are the files on disk
  /** The current state: the checkpoint plus every log record since. */
  #blobs: Record<string, number>;
  #dirty: Map<string, Dirty>;
  #kept = new Map<string, Dirty>();
  #clock: number;
  #log: AppendLog;
  #walKey: Buffer;
  /** The generation being appended to (the checkpoint's, or the one after while it is checkpointed). */
  #gen: number;
  #half: number;
  #walSeq = 1;
  #walOff = 0;
  /** The checkpoint of the previous generation, written while appends go on in the other half. */
  #background: Promise<void> | null = null;
  /** After a failed append the tail of the log is uncertain: the next batch checkpoints instead. */
  #mustCheckpoint = false;
  #append: 'sync' | 'async';
  #queue: Op[] = [];
  #running: Promise<void> | null = null;
  #pending = new Map<string, number>();
  #lastBatch = 0;
  #gathered: (() => void) | null = null;
  readonly stats: StoreStats = { commits: 0, saves: 0, coalesced: 0, checkpoints: 0, replayed: 0, appends: 0 };
  /** Why replay stopped at open (the end of the records, a torn one, …), for the log. */
  readonly replayStop: string;

  private constructor(
    readonly ops: StoreOps,
    private readonly macKey: Buffer,
    private readonly snapshotTable: () => unknown,
    init: { ck: MetaRecord; log: AppendLog; replayed: number; replayStop: string; append: 'sync' | 'async' },
  ) {
    this.#ck = init.ck;
    this.#blobs = { ...init.ck.blobs };
    this.#dirty = new Map();
    this.#clock = init.ck.clock;
    this.#log = init.log;
    this.#gen = init.ck.walGen;
    this.#half = init.ck.walHalf;
    this.#walKey = walKey(macKey);
    this.#append = init.append;
    this.stats.replayed = init.replayed;
    this.replayStop = init.replayStop;
  }

  /**
   * Opens the store: verifies the metadata MAC, replays the log, checkpoints the result under the next
   * log generation, then removes every blob file the new metadata does not name (generations a crash
   * left uncommitted, superseded ones not yet removed).
   */
  static async open(
    ops: StoreOps,
    macKey: Buffer,
    snapshotTable: () => unknown,
    opts: StoreOptions = {},
  ): Promise<{ store: GroupCommitStore; table: unknown }> {
    await ops.prepare();
    const raw = await ops.readMeta();
    // A new store starts at a random log generation: a log file left by some other store (its metadata
    // lost) can then never pass for ours.
    const ck: MetaRecord = raw
      ? decodeMeta(raw, macKey)
      : { format: 2, seq: 0, clock: 0, blobs: {}, table: null, walGen: crypto.randomInt(1, 2 ** 40), walHalf: 0 };
    const view: View = { blobs: { ...ck.blobs }, dirty: new Map(), kept: new Map(), table: ck.table, clock: ck.clock };
    const { replayed, replayStop } = raw && ck.walGen > 0 ? await replayLog(ops, macKey, ck, view) : { replayed: 0, replayStop: 'no log' };
    const logBytes = opts.logBytes ?? DEFAULT_WAL_BYTES;
    // The last run may have sealed blobs under generations above the clock it made durable (reserved
    // after its last commit, written, never committed). Reusing those numbers would let a copy of such
    // a blob pass for a later save, so every start moves the clock far past them, durably, first.
    // The log moves two generations on: both that replay read may hold records.
    const next: MetaRecord = {
      format: 2,
      seq: ck.seq + 1,
      clock: raw ? view.clock + CLOCK_JUMP : view.clock,
      blobs: view.blobs,
      table: view.table,
      walGen: ck.walGen + 2,
      walHalf: Math.floor(logBytes / 2),
    };
    // The replayed blobs become files and the log generation moves on before anything new is logged,
    // so this start's records can never be mistaken for the last run's.
    await ops.commit(
      [...view.dirty].map(([k, d]) => ({ name: nameOf(k, d.generation), data: materialize(d) })),
      encodeMeta(next, macKey),
    );
    const live = new Set(Object.entries(next.blobs).map(([k, g]) => nameOf(k, g)));
    await ops.removeBlobs((await ops.listBlobs()).filter((n) => !live.has(n)));
    const log = await ops.openLog(logBytes);
    const store = new GroupCommitStore(ops, macKey, snapshotTable, { ck: next, log, replayed, replayStop, append: opts.append ?? 'sync' });
    return { store, table: next.table };
  }

  get description(): string {
    return this.ops.description;
  }

  /** The next generation (unique, increasing); the caller seals the blob under it, then save()s. */
  reserve(): number {
    return ++this.#clock;
  }

  generation(instance: number, kind: StateKind): number | undefined {
    return this.#blobs[blobKey(instance, kind)];
  }

  /** Resolves once the blob is durable (a log record, or a checkpoint) and will be loaded after a crash. */
  save(instance: number, kind: StateKind, generation: number, data: Uint8Array): Promise<void> {
    return this.#enqueue({ type: 'save', instance, kind, generation, data }, [blobKey(instance, kind)]);
  }

  /**
   * Appends a sealed piece to the blob of (instance, kind), which must be at generation `onto` and in
   * memory; durable like a save. Else refused (StoreError STALE): the caller saves the whole blob.
   */
  append(instance: number, kind: StateKind, onto: number, generation: number, data: Uint8Array): Promise<void> {
    return this.#enqueue({ type: 'append', instance, kind, onto, generation, data }, [blobKey(instance, kind)]);
  }

  remove(instance: number, kinds: readonly StateKind[] = STATE_KINDS): Promise<void> {
    return this.#enqueue({ type: 'remove', instance, kinds }, kinds.map((k) => blobKey(instance, k)));
  }

  /** Makes the current VM table durable (in the next log record). */
  commitTable(): Promise<void> {
    return this.#enqueue({ type: 'meta' }, []);
  }

  /** Writes the current state as files + metadata and starts a new log generation. */
  checkpoint(): Promise<void> {
    return this.#enqueue({ type: 'checkpoint' }, []);
  }

  /** The live blob and its generation; waits for queued saves of the same blob first. */
  async load(instance: number, kind: StateKind): Promise<{ generation: number; data: Buffer } | null> {
    const k = blobKey(instance, kind);
    while (this.#pending.has(k) && this.#running) await this.#running.catch(() => undefined);
    for (;;) {
      const g = this.#blobs[k];
      if (g === undefined) return null;
      const d = inMemory({ dirty: this.#dirty, kept: this.#kept }, k, g);
      if (d) return { generation: g, data: Buffer.from(materialize(d)) };
      const data = await this.ops.readBlob(blobName(instance, kind, g));
      if (data) return { generation: g, data };
      // Superseded and removed while we read: the view now names a newer one.
      if (this.#blobs[k] === g) throw new StoreError('MISSING_BLOB', `blob ${blobName(instance, kind, g)} named by the metadata is missing`);
    }
  }

  #enqueue(op: OpInput, keys: string[]): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      for (const k of keys) this.#pending.set(k, (this.#pending.get(k) ?? 0) + 1);
      const release = (): void => {
        for (const k of keys) {
          const n = this.#pending.get(k)! - 1;
          if (n === 0) this.#pending.delete(k);
          else this.#pending.set(k, n);
        }
      };
      this.#queue.push({
        ...op,
        done: {
          resolve: () => (release(), resolve()),
          reject: (e) => (release(), reject(e)),
        },
      });
      if (!this.#running) this.#running = this.#gather(this.#lastBatch).then(() => this.#drain());
      else this.#gathered?.();
    });
  }

  /**
   * When to start the next commit. Operations are queued and a commit started at once if it could not
   * take more (the clients that were in the last commit have all sent their next request, or only one
   * client is active); otherwise it waits up to GATHER_MS for them (PostgreSQL's commit_delay idea),
   * because the clients just acknowledged are sending their next saves right now and would otherwise
   * split into cohorts that take turns, each paying the full fsync cost.
   */
  #gather(target: number): Promise<void> {
    if (this.#queue.length >= target || target <= 1) return new Promise((r) => setImmediate(r));
    return new Promise((resolve) => {
      // Through setImmediate: the requests the other FIFOs already hold are read in this same poll
      // phase and join the batch (resolving at once committed the first `target` and left the rest of
      // the cohort for the next commit; with sync appends batches stayed at that size).
      const done = (): void => {
        clearTimeout(timer);
        this.#gathered = null;
        setImmediate(resolve);
      };
      const timer = setTimeout(done, GATHER_MS);
      this.#gathered = () => {
        if (this.#queue.length >= target) done();
      };
    });
  }

  async #drain(): Promise<void> {
    try {
      while (this.#queue.length > 0) {
        const batch = this.#queue;
        this.#queue = [];
        this.#lastBatch = batch.length;
        await this.#commit(batch);
        // Those queued meanwhile, plus the ones just acknowledged, who are likely to be back at once:
        // counted by blob, since a save queued meanwhile may be an acknowledged client already back
        // (counting it twice made a lone fast client wait out GATHER_MS on every save).
        if (this.#queue.length > 0) await this.#gather(expected(batch, this.#queue));
      }
    } finally {
      this.#running = null;
    }
  }

  async #commit(batch: Op[]): Promise<void> {
    // The batch's net effect per blob: its last save, or a removal.
    const blobs = { ...this.#blobs };
    const writes = new Map<string, { instance: number; kind: StateKind; generation: number; data: Uint8Array }>();
    const removes = new Map<string, { instance: number; kind: StateKind }>();
    const appends: WalAppend[] = [];
    const appended = new Set<string>(); // the blobs with a piece in `appends`
    const rejected = new Set<Op>();
    let saves = 0;
    let tableChanged = false;
    let checkpoint = this.#mustCheckpoint;
    for (const op of batch) {
      if (op.type === 'save') {
        const k = blobKey(op.instance, op.kind);
        saves++;
        if (writes.has(k)) this.stats.coalesced++;
        blobs[k] = op.generation;
        writes.set(k, { instance: op.instance, kind: op.kind, generation: op.generation, data: op.data });
        removes.delete(k);
        dropAppends(k);
      } else if (op.type === 'remove') {
        tableChanged = true;
        for (const kind of op.kinds) {
          const k = blobKey(op.instance, kind);
          delete blobs[k];
          writes.delete(k);
          removes.set(k, { instance: op.instance, kind });
          dropAppends(k);
        }
      } else if (op.type === 'append') {
        const k = blobKey(op.instance, op.kind);
        const held = writes.has(k) || appended.has(k) || inMemory({ dirty: this.#dirty, kept: this.#kept }, k, blobs[k]);
        if (blobs[k] !== op.onto || !held) {
          rejected.add(op);
          op.done.reject(new StoreError('STALE', `append to ${k} onto generation ${op.onto}: the blob is at ${blobs[k] ?? 'none'}${held ? '' : ' and not in memory'}`));
          continue;
        }
        blobs[k] = op.generation;
        appends.push({ instance: op.instance, kind: op.kind, onto: op.onto, generation: op.generation, data: op.data });
        appended.add(k);
      } else if (op.type === 'meta') tableChanged = true;
      else checkpoint = true;
    }
    // An append superseded in its batch (by a later save or removal of the blob) is never written.
    function dropAppends(k: string): void {
      if (!appended.delete(k)) return;
      for (let i = appends.length - 1; i >= 0; i--) if (blobKey(appends[i]!.instance, appends[i]!.kind) === k) appends.splice(i, 1);
    }
    batch = batch.filter((op) => !rejected.has(op));
    if (batch.length === 0) return;
    const rec: WalRecord = {
      gen: this.#gen,
      seq: this.#walSeq,
      clock: this.#clock,
      saves: [...writes.values()],
      removes: [...removes.values()],
      appends,
      table: tableChanged ? this.snapshotTable() : undefined,
    };
    const fail = (err: unknown, how: string): void => {
      const e = new StoreError('IO', `${how} of ${batch.length} operations on ${this.ops.description} failed: ${(err as Error).message}`);
      for (const op of batch) op.done.reject(e);
    };
    let bytes = checkpoint ? null : encodeRecord(rec, this.#walKey);
    if (bytes && bytes.length <= this.#half && this.#walOff + bytes.length > this.#half) {
      // This half is full: the next generation goes to the other half, free once the checkpoint of
      // the generation before is durable; this one is checkpointed meanwhile.
      if (this.#background) await this.#background;
      if (this.#mustCheckpoint) bytes = null;
      else {
        this.#startBackground();
        bytes = encodeRecord({ ...rec, gen: this.#gen, seq: this.#walSeq }, this.#walKey);
      }
    }
    if (bytes && this.#walOff + bytes.length <= this.#half) {
      const at = (this.#gen % 2) * this.#half + this.#walOff;
      try {
        if (this.#append === 'sync') this.#log.writeSync(bytes, at);
        else await this.#log.write(bytes, at);
      } catch (err) {
        this.#mustCheckpoint = true;
        return fail(err, 'log append');
      }
      this.#walOff += bytes.length;
      this.#walSeq++;
      // Onto the state before the batch (`blobs` holds its outcome already): appends check their base.
      this.#blobs = { ...this.#blobs };
      applyRecord(rec, { blobs: this.#blobs, dirty: this.#dirty, kept: this.#kept, table: null, clock: 0 });
      this.stats.appends! += appends.length;
      this.stats.commits++;
      this.stats.saves += saves;
      observeCommit('log', batch.length, saves);
      for (const op of batch) op.done.resolve();
      return;
    }
    // A checkpoint with this batch in it (asked for, a record larger than half the log, or after a
    // failure): every blob only the log holds, plus this batch's, as files; the metadata names them and
    // the next log generation. Not concurrently with a background one (both would write the metadata).
    if (this.#background) await this.#background;
    const dirty = new Map(this.#dirty);
    applyRecord(rec, { blobs: { ...this.#blobs }, dirty, kept: new Map(this.#kept), table: null, clock: 0 });
    const snap = { blobs, dirty, table: this.snapshotTable(), clock: this.#clock };
    const written = await this.#writeCheckpoint(snap, this.#gen + 1).catch((err: unknown) => void fail(err, 'checkpoint'));
    if (!written) return;
    this.#gen++;
    this.#walSeq = 1;
    this.#walOff = 0;
    this.#blobs = blobs;
    this.#dirty.clear();
    this.#keep(written);
    this.stats.appends! += appends.length;
    this.#mustCheckpoint = false;
    this.stats.commits++;
    this.stats.saves += saves;
    observeCommit('checkpoint', batch.length, saves);
    for (const op of batch) op.done.resolve();
    await this.#removeStale();
  }

  /** Moves appends to the next generation and checkpoints the state as of now in the background. */
  #startBackground(): void {
    const snap = { blobs: { ...this.#blobs }, dirty: new Map(this.#dirty), table: this.snapshotTable(), clock: this.#clock };
    this.#gen++;
    this.#walSeq = 1;
    this.#walOff = 0;
    this.#background = (async () => {
      try {
        const written = await this.#writeCheckpoint(snap, this.#gen);
        // In files now, unless saved again since (then the newer copy is in this generation's records).
        for (const [k, d] of snap.dirty) if (this.#dirty.get(k) === d) this.#dirty.delete(k);
        this.#keep(new Map([...written].filter(([k, d]) => !this.#dirty.has(k) && this.#blobs[k] === d.generation)));
        await this.#removeStale();
      } catch {
        // The previous generation's records are still needed: the next batch checkpoints in line
        // (and reports a failure to its callers) before that half is reused.
        this.#mustCheckpoint = true;
      } finally {
        this.#background = null;
      }
    })();
  }

  /** Volatile blobs just written stay in memory for pieces; others leave unless an operation on them is queued. */
  #keep(written: Map<string, Dirty>): void {
    const next = new Map([...written].filter(([k]) => k.endsWith('.volatile')));
    for (const [k, d] of this.#kept) if (!next.has(k) && this.#pending.has(k)) next.set(k, d);
    this.#kept = next;
  }

  #stale: string[] = [];

  /**
   * Writes a checkpoint: `snap.dirty` as files (each blob with its pieces as one), then the metadata
   * naming `snap.blobs` and log generation `walGen`. Returns what it wrote, by blob.
   */
  async #writeCheckpoint(snap: { blobs: Record<string, number>; dirty: Map<string, Dirty>; table: unknown; clock: number }, walGen: number): Promise<Map<string, Dirty>> {
    const next: MetaRecord = { format: 2, seq: this.#ck.seq + 1, clock: snap.clock, blobs: snap.blobs, table: snap.table, walGen, walHalf: this.#half };
    const written = new Map<string, Dirty>([...snap.dirty].map(([k, d]) => [k, { generation: d.generation, data: materialize(d), pieces: [] }]));
    await this.ops.commit(
      [...written].map(([k, d]) => ({ name: nameOf(k, d.generation), data: d.data })),
      encodeMeta(next, this.macKey),
    );
    // Files of the previous checkpoint that this one no longer names: removed only now (a crash
    // before the new metadata was durable needed them).
    const old = this.#ck.blobs;
    this.#stale.push(...Object.entries(old).filter(([k, g]) => snap.blobs[k] !== g).map(([k, g]) => nameOf(k, g)));
    this.#ck = next;
    this.stats.checkpoints++;
    managerMetrics().checkpoints.inc();
    return written;
  }

  async #removeStale(): Promise<void> {
    const stale = this.#stale.splice(0);
    if (stale.length) await this.ops.removeBlobs(stale).catch(() => undefined);
  }

  /** Waits for every queued operation to be committed. */
  async flush(): Promise<void> {
    while (this.#running || this.#background) {
      await this.#running?.catch(() => undefined);
      await this.#background;
    }
  }

  /** Clean shutdown: commits what is queued, checkpoints (the next start replays nothing), closes the log. */
  async close(): Promise<void> {
    try {
      await this.flush();
      await this.checkpoint();
      await this.flush(); // the superseded files' removal follows the acknowledgement
    } finally {
      this.#log.close();
    }
  }
}
