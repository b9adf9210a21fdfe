// The manager's durable state: sealed vTPM blobs plus one metadata record (VM table, expected blob
// generations), on a storage backend behind a small ops table (swtpm's nvram_backend_ops: prepare,
// load, store, delete), with a directory backend first.
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
// else from the blob files.
// Group commit. Saves arriving while a commit runs queue up and go in the next one.
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { DEFAULT_WAL_BYTES, WAL_FILE, encodeRecord, replay, walKey, type AppendLog, type WalRecord } from './wal.js';

export class StoreError extends Error {
  constructor(
    readonly code: 'META_TAMPERED' | 'META_FORMAT' | 'MISSING_BLOB' | 'IO',
    message: string,
  ) {
    super(message);
    this.name = 'StoreError';
  }
}

/** What a storage backend must do; everything above it (generations, batching, MAC) is shared. */
export interface StoreOps {
  readonly description: string;
  /** Creates what the backend needs and removes what a crash left half-written. */
  prepare(): Promise<void>;
  readMeta(): Promise<Buffer | null>;
  /**
   * Stores new blobs under names never used before and then atomically replaces the metadata; both
   * durable when resolved, and the metadata switch must not become durable before the blobs are.
   */
  commit(items: ReadonlyArray<{ name: string; data: Uint8Array }>, meta: Uint8Array): Promise<void>;
  readBlob(name: string): Promise<Buffer | null>;
  /** Best effort: a blob left behind is garbage the next prepare()/open removes. */
  removeBlobs(names: readonly string[]): Promise<void>;
  listBlobs(): Promise<string[]>;
  /** The whole write-ahead log as it is on disk, or null when there is none. */
  readLog(): Promise<Buffer | null>;
  /**
   * The log, ready for appends: (re)created full of zeros at `bytes` when missing or of another size.
   * Called only after a checkpoint, when nothing in the old log is needed any more.
   */
  openLog(bytes: number): Promise<AppendLog>;
}

const META = 'meta';
/** How long a commit waits for stragglers when the previous one was shared (see #gather). */
const GATHER_MS = 5;
/** How far each start advances the generation clock (far more than one run reserves between commits). */
export const CLOCK_JUMP = 2 ** 24;
const BLOB_RE = /^i(\d+)\.(permanent|volatile|savestate)\.g(\d+)\.blob$/;

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function writeDurable(file: string, data: Uint8Array): Promise<void> {
  const fh = await fsp.open(file, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
  try {
    await fh.writeFile(data);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** Blobs and metadata as files in one directory (the analogue of swtpm_nvstore_dir.c). */
export class DirOps implements StoreOps {
  readonly description: string;
  constructor(readonly dir: string) {
    this.description = `dir:${dir}`;
  }

  async prepare(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    for (const f of await fsp.readdir(this.dir)) if (f.endsWith('.tmp')) await fsp.rm(path.join(this.dir, f), { force: true });
  }

  async readMeta(): Promise<Buffer | null> {
    return this.readBlob(META);
  }

  /**
   * Blob temp files and the metadata temp file are written and fdatasync'd in parallel; the blobs are
   * renamed into place and the directory fsync'd; only then is the metadata renamed over the old one
   * and the directory fsync'd again. Two directory fsyncs, so the order holds on any file system.
   */
  async commit(items: ReadonlyArray<{ name: string; data: Uint8Array }>, meta: Uint8Array): Promise<void> {
    const metaTmp = path.join(this.dir, `${META}.tmp`);
    await Promise.all([
      writeDurable(metaTmp, meta),
      ...items.map(async ({ name, data }) => {
        const tmp = path.join(this.dir, `${name}.tmp`);
        await writeDurable(tmp, data);
        await fsp.rename(tmp, path.join(this.dir, name));
      }),
    ]);
    if (items.length > 0) await fsyncDir(this.dir);
    await fsp.rename(metaTmp, path.join(this.dir, META));
    await fsyncDir(this.dir);
  }

  async readBlob(name: string): Promise<Buffer | null> {
    try {
      return await fsp.readFile(path.join(this.dir, name));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }

  async removeBlobs(names: readonly string[]): Promise<void> {
    await Promise.all(names.map((n) => fsp.rm(path.join(this.dir, n), { force: true })));
  }

  async listBlobs(): Promise<string[]> {
    return (await fsp.readdir(this.dir)).filter((f) => BLOB_RE.test(f));
  }

  readLog(): Promise<Buffer | null> {
    return this.readBlob(WAL_FILE);
  }

  async openLog(bytes: number): Promise<AppendLog> {
    const file = path.join(this.dir, WAL_FILE);
    const have = await fsp.stat(file).then((st) => st.size, () => -1);
    if (have !== bytes) {
      // Zeros written, not a sparse ftruncate or fallocate: both leave blocks that the first write
      // into them must allocate or convert, a journal commit on that fdatasync. Measured on ext4 here
      // (9.4 KB pwrite + fdatasync, 400 each, p50): pre-zeroed 0.19–0.60 ms, fallocate 0.26–0.66 ms,
      // sparse 0.24–1.1 ms; noisy, but zeros were never worse, and they are what the design needs.
      const tmp = `${file}.tmp`;
      const fh = await fsp.open(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
      try {
        const zeros = Buffer.alloc(Math.min(bytes, 1 << 20));
        for (let o = 0; o < bytes; o += zeros.length) await fh.write(zeros, 0, Math.min(zeros.length, bytes - o), o);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, file);
      await fsyncDir(this.dir);
    }
    return new DirLog(fs.openSync(file, fs.constants.O_RDWR), bytes);
  }
}

/** The log file: one positioned write of the whole record, then fdatasync. */
class DirLog implements AppendLog {
  constructor(
    private fd: number,
    readonly size: number,
  ) {}

  writeSync(data: Uint8Array, position: number): void {
    for (let o = 0; o < data.length; ) o += fs.writeSync(this.fd, data, o, data.length - o, position + o);
    fs.fdatasyncSync(this.fd);
  }

  async write(data: Uint8Array, position: number): Promise<void> {
    for (let o = 0; o < data.length; ) {
      o += await new Promise<number>((resolve, reject) =>
        fs.write(this.fd, data, o, data.length - o, position + o, (err, n) => (err ? reject(err) : resolve(n))),
      );
    }
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}

export function blobName(instance: number, kind: StateKind, generation: number): string {
  return `i${instance}.${kind}.g${generation}.blob`;
}

function key(instance: number, kind: StateKind): string {
  return `${instance}.${kind}`;
}

function nameOf(k: string, generation: number): string {
  const [i, kind] = k.split('.') as [string, StateKind];
  return blobName(Number(i), kind, generation);
}

interface MetaRecord {
  format: 2;
  /** Bumped on every checkpoint. */
  seq: number;
  /** Highest generation ever handed out; generations never repeat, even across a DELETE. */
  clock: number;
  /** "instance.kind" → generation of the live blob. */
  blobs: Record<string, number>;
  table: unknown;
  /**
   * The log generation whose records continue this checkpoint, then the one after it: generation g is
   * appended to half g % 2 of the log file, numbered from 1 at the start of that half.
   */
  walGen: number;
  /** Bytes per log half (so a log file cut short is still read at the right offsets). */
  walHalf: number;
}

const META_MAGIC = Buffer.from('VTPMMETA', 'ascii');

function encodeMeta(m: MetaRecord, macKey: Buffer): Buffer {
  const json = Buffer.from(JSON.stringify(m));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(json.length);
  const body = Buffer.concat([META_MAGIC, len, json]);
  return Buffer.concat([body, crypto.createHmac('sha256', macKey).update(body).digest()]);
}

function decodeMeta(b: Buffer, macKey: Buffer): MetaRecord {
  if (b.length < 8 + 4 + 32 || !b.subarray(0, 8).equals(META_MAGIC)) throw new StoreError('META_FORMAT', 'metadata file has no VTPMMETA header');
  const len = b.readUInt32BE(8);
  if (b.length !== 12 + len + 32) throw new StoreError('META_FORMAT', `metadata length ${b.length} does not match its header (${12 + len + 32})`);
  const body = b.subarray(0, 12 + len);
  const mac = crypto.createHmac('sha256', macKey).update(body).digest();
  if (!crypto.timingSafeEqual(mac, b.subarray(12 + len)))
    throw new StoreError('META_TAMPERED', 'metadata MAC does not verify (tampered, or a different master key)');
  const m = JSON.parse(body.subarray(12).toString('utf8')) as Omit<MetaRecord, 'format' | 'walGen' | 'walHalf'> & { format: number; walGen?: number; walHalf?: number };
  if ((m.format !== 1 && m.format !== 2) || typeof m.seq !== 'number' || typeof m.clock !== 'number' || typeof m.blobs !== 'object')
    throw new StoreError('META_FORMAT', 'metadata record is malformed');
  // Format 1 (before the log) has no log generation: nothing to replay.
  if (m.format === 2 && (typeof m.walGen !== 'number' || typeof m.walHalf !== 'number')) throw new StoreError('META_FORMAT', 'metadata record has no log generation');
  return { ...m, format: 2, walGen: m.walGen ?? 0, walHalf: m.walHalf ?? 0 };
}

type Op =
  | { type: 'save'; instance: number; kind: StateKind; generation: number; data: Uint8Array; done: Deferred }
  | { type: 'remove'; instance: number; kinds: readonly StateKind[]; done: Deferred }
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

/** Applies one replayed record (or a committed batch) to a view: saves, removals, table, clock. */
function applyRecord(r: WalRecord, view: { blobs: Record<string, number>; dirty: Map<string, Dirty>; table: unknown; clock: number }): void {
  for (const s of r.saves) {
    const k = key(s.instance, s.kind);
    view.blobs[k] = s.generation;
    view.dirty.set(k, { generation: s.generation, data: s.data });
  }
  for (const x of r.removes) {
    const k = key(x.instance, x.kind);
    delete view.blobs[k];
    view.dirty.delete(k);
  }
  if (r.table !== undefined) view.table = r.table;
  view.clock = Math.max(view.clock, r.clock, ...r.saves.map((s) => s.generation));
}

/** A blob saved since the last checkpoint: its only durable copy is in the log. */
interface Dirty {
  generation: number;
  data: Uint8Array;
}

/** How many distinct savers a batch and the queue behind it represent (other operations count once each). */
function expected(batch: readonly Op[], queue: readonly Op[]): number {
  const keys = new Set<string>();
  let other = 0;
  for (const op of [...batch, ...queue]) {
    if (op.type === 'save') keys.add(key(op.instance, op.kind));
    else other++;
  }
  return keys.size + other;
}

export class GroupCommitStore {
  /** The last durable checkpoint: its blobs are the files on disk. */
  #ck: MetaRecord;
  /** The current state: the checkpoint plus every log record since. */
  #blobs: Record<string, number>;
  #dirty: Map<string, Dirty>;
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
  readonly stats: StoreStats = { commits: 0, saves: 0, coalesced: 0, checkpoints: 0, replayed: 0 };
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
    const view = { blobs: { ...ck.blobs }, dirty: new Map<string, Dirty>(), table: ck.table, clock: ck.clock };
    let replayed = 0;
    let replayStop = 'no log';
    if (raw && ck.walGen > 0) {
      const log = await ops.readLog();
      if (log) {
        // The checkpoint's generation, then the next one, written while that checkpoint was under way
        // (a generation after that needs this checkpoint durable first, so the metadata would name it).
        const key = walKey(macKey);
        const stops: string[] = [];
        for (const gen of [ck.walGen, ck.walGen + 1]) {
          const base = (gen % 2) * ck.walHalf;
          const r = replay(log.subarray(Math.min(base, log.length), Math.min(base + ck.walHalf, log.length)), key, gen);
          for (const rec of r.records) applyRecord(rec, view);
          replayed += r.records.length;
          stops.push(`generation ${gen}: ${r.stop}`);
        }
        replayStop = stops.join('; ');
      }
    }
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
      [...view.dirty].map(([k, d]) => ({ name: nameOf(k, d.generation), data: d.data })),
      encodeMeta(next, macKey),
    );
    const live = new Set(Object.entries(next.blobs).map(([k, g]) => nameOf(k, g)));
    await ops.removeBlobs((await ops.listBlobs()).filter((n) => !live.has(n)));
    const log = await ops.openLog(logBytes);
    const store = new GroupCommitStore(ops, macKey, snapshotTable, { ck: next, log, replayed, replayStop, append: opts.append ?? 'sync' });
    return { store, table: next.table };
  }

  /** The next generation (unique, increasing); the caller seals the blob under it, then save()s. */
  reserve(): number {
    return ++this.#clock;
  }

  generation(instance: number, kind: StateKind): number | undefined {
    return this.#blobs[key(instance, kind)];
  }

  /** Resolves once the blob is durable (a log record, or a checkpoint) and will be loaded after a crash. */
  save(instance: number, kind: StateKind, generation: number, data: Uint8Array): Promise<void> {
    return this.#enqueue({ type: 'save', instance, kind, generation, data }, [key(instance, kind)]);
  }

  remove(instance: number, kinds: readonly StateKind[] = STATE_KINDS): Promise<void> {
    return this.#enqueue({ type: 'remove', instance, kinds }, kinds.map((k) => key(instance, k)));
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
    const k = key(instance, kind);
    while (this.#pending.has(k) && this.#running) await this.#running.catch(() => undefined);
    for (;;) {
      const g = this.#blobs[k];
      if (g === undefined) return null;
      const d = this.#dirty.get(k);
      if (d && d.generation === g) return { generation: g, data: Buffer.from(d.data) };
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
    let saves = 0;
    let tableChanged = false;
    let checkpoint = this.#mustCheckpoint;
    for (const op of batch) {
      if (op.type === 'save') {
        const k = key(op.instance, op.kind);
        saves++;
        if (writes.has(k)) this.stats.coalesced++;
        blobs[k] = op.generation;
        writes.set(k, { instance: op.instance, kind: op.kind, generation: op.generation, data: op.data });
        removes.delete(k);
      } else if (op.type === 'remove') {
        tableChanged = true;
        for (const kind of op.kinds) {
          const k = key(op.instance, kind);
          delete blobs[k];
          writes.delete(k);
          removes.set(k, { instance: op.instance, kind });
        }
      } else if (op.type === 'meta') tableChanged = true;
      else checkpoint = true;
    }
    const rec: WalRecord = {
      gen: this.#gen,
      seq: this.#walSeq,
      clock: this.#clock,
      saves: [...writes.values()],
      removes: [...removes.values()],
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
      this.#blobs = blobs;
      applyRecord(rec, { blobs, dirty: this.#dirty, table: null, clock: 0 });
      this.stats.commits++;
      this.stats.saves += saves;
      for (const op of batch) op.done.resolve();
      return;
    }
    // A checkpoint with this batch in it (asked for, a record larger than half the log, or after a
    // failure): every blob only the log holds, plus this batch's, as files; the metadata names them and
    // the next log generation. Not concurrently with a background one (both would write the metadata).
    if (this.#background) await this.#background;
    const dirty = new Map(this.#dirty);
    applyRecord(rec, { blobs: { ...this.#blobs }, dirty, table: null, clock: 0 });
    const snap = { blobs, dirty, table: this.snapshotTable(), clock: this.#clock };
    try {
      await this.#writeCheckpoint(snap, this.#gen + 1);
    } catch (err) {
      return fail(err, 'checkpoint');
    }
    this.#gen++;
    this.#walSeq = 1;
    this.#walOff = 0;
    this.#blobs = blobs;
    this.#dirty.clear();
    this.#mustCheckpoint = false;
    this.stats.commits++;
    this.stats.saves += saves;
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
        await this.#writeCheckpoint(snap, this.#gen);
        // In files now, unless saved again since (then the newer copy is in this generation's records).
        for (const [k, d] of snap.dirty) if (this.#dirty.get(k) === d) this.#dirty.delete(k);
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

  #stale: string[] = [];

  /** Writes a checkpoint: `snap.dirty` as files, then the metadata naming `snap.blobs` and log generation `walGen`. */
  async #writeCheckpoint(snap: { blobs: Record<string, number>; dirty: Map<string, Dirty>; table: unknown; clock: number }, walGen: number): Promise<void> {
    const next: MetaRecord = { format: 2, seq: this.#ck.seq + 1, clock: snap.clock, blobs: snap.blobs, table: snap.table, walGen, walHalf: this.#half };
    await this.ops.commit(
      [...snap.dirty].map(([k, d]) => ({ name: nameOf(k, d.generation), data: d.data })),
      encodeMeta(next, this.macKey),
    );
    // Files of the previous checkpoint that this one no longer names: removed only now (a crash
    // before the new metadata was durable needed them).
    const old = this.#ck.blobs;
    this.#stale.push(...Object.entries(old).filter(([k, g]) => snap.blobs[k] !== g).map(([k, g]) => nameOf(k, g)));
    this.#ck = next;
    this.stats.checkpoints++;
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
