// The manager's durable state: sealed vTPM blobs plus one metadata record (VM table, expected blob
// generations), on a storage backend behind a small ops table (swtpm's nvram_backend_ops: prepare,
// load, store, delete), with a directory backend first.
//
// Crash safety. A blob is never overwritten: each save writes a fresh generation under its own name
// (temp file, fdatasync, rename, directory fsync); the metadata then switches to it atomically (temp,
// fdatasync, rename, directory fsync); superseded files are removed only after that. A crash at any
// point leaves the metadata naming either the old or the new generation, and both files exist.
// Group commit. Saves arriving while a commit runs queue up and go in the next one: their blob fsyncs
// run in parallel (with the metadata's), and they share the two directory fsyncs and the one metadata
// write.
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';

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
}

export function blobName(instance: number, kind: StateKind, generation: number): string {
  return `i${instance}.${kind}.g${generation}.blob`;
}

function key(instance: number, kind: StateKind): string {
  return `${instance}.${kind}`;
}

interface MetaRecord {
  format: 1;
  /** Bumped on every commit. */
  seq: number;
  /** Highest generation ever handed out; generations never repeat, even across a DELETE. */
  clock: number;
  /** "instance.kind" → generation of the live blob. */
  blobs: Record<string, number>;
  table: unknown;
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
  const m = JSON.parse(body.subarray(12).toString('utf8')) as MetaRecord;
  if (m.format !== 1 || typeof m.seq !== 'number' || typeof m.clock !== 'number' || typeof m.blobs !== 'object')
    throw new StoreError('META_FORMAT', 'metadata record is malformed');
  return m;
}

type Op =
  | { type: 'save'; instance: number; kind: StateKind; generation: number; data: Uint8Array; done: Deferred }
  | { type: 'remove'; instance: number; kinds: readonly StateKind[]; done: Deferred }
  | { type: 'meta'; done: Deferred };

type OpInput = Op extends infer T ? (T extends Op ? Omit<T, 'done'> : never) : never;

interface Deferred {
  resolve: () => void;
  reject: (e: Error) => void;
}

export interface StoreStats {
  commits: number;
  saves: number;
  /** Saves superseded inside their batch by a newer save of the same blob (written never). */
  coalesced: number;
}

export class GroupCommitStore {
  #meta: MetaRecord;
  #queue: Op[] = [];
  #running: Promise<void> | null = null;
  #pending = new Map<string, number>();
  #lastBatch = 0;
  #gathered: (() => void) | null = null;
  readonly stats: StoreStats = { commits: 0, saves: 0, coalesced: 0 };

  private constructor(
    readonly ops: StoreOps,
    private readonly macKey: Buffer,
    meta: MetaRecord,
    private readonly snapshotTable: () => unknown,
  ) {
    this.#meta = meta;
  }

  /**
   * Opens the store: verifies the metadata MAC, then removes every blob the metadata does not name
   * (generations a crash left uncommitted, superseded ones not yet removed).
   */
  static async open(ops: StoreOps, macKey: Buffer, snapshotTable: () => unknown): Promise<{ store: GroupCommitStore; table: unknown }> {
    await ops.prepare();
    const raw = await ops.readMeta();
    const meta: MetaRecord = raw ? decodeMeta(raw, macKey) : { format: 1, seq: 0, clock: 0, blobs: {}, table: null };
    const live = new Set(Object.entries(meta.blobs).map(([k, g]) => {
      const [i, kind] = k.split('.') as [string, StateKind];
      return blobName(Number(i), kind, g);
    }));
    await ops.removeBlobs((await ops.listBlobs()).filter((n) => !live.has(n)));
    // The last run may have sealed blobs under generations above the clock it made durable (reserved
    // after its last commit, written, never committed). Reusing those numbers would let a copy of such
    // a blob pass for a later save, so every start moves the clock far past them, durably, first.
    if (raw) {
      meta.clock += CLOCK_JUMP;
      meta.seq += 1;
      await ops.commit([], encodeMeta(meta, macKey));
    }
    return { store: new GroupCommitStore(ops, macKey, meta, snapshotTable), table: meta.table };
  }

  /** The next generation (unique, increasing); the caller seals the blob under it, then save()s. */
  reserve(): number {
    return ++this.#meta.clock;
  }

  generation(instance: number, kind: StateKind): number | undefined {
    return this.#meta.blobs[key(instance, kind)];
  }

  /** Resolves once the blob and the metadata naming it are durable. */
  save(instance: number, kind: StateKind, generation: number, data: Uint8Array): Promise<void> {
    return this.#enqueue({ type: 'save', instance, kind, generation, data }, [key(instance, kind)]);
  }

  remove(instance: number, kinds: readonly StateKind[] = STATE_KINDS): Promise<void> {
    return this.#enqueue({ type: 'remove', instance, kinds }, kinds.map((k) => key(instance, k)));
  }

  /** Makes the current VM table durable (it rides along with every commit anyway). */
  commitTable(): Promise<void> {
    return this.#enqueue({ type: 'meta' }, []);
  }

  /** The live blob and its generation; waits for queued saves of the same blob first. */
  async load(instance: number, kind: StateKind): Promise<{ generation: number; data: Buffer } | null> {
    const k = key(instance, kind);
    while (this.#pending.has(k) && this.#running) await this.#running.catch(() => undefined);
    for (;;) {
      const g = this.#meta.blobs[k];
      if (g === undefined) return null;
      const data = await this.ops.readBlob(blobName(instance, kind, g));
      if (data) return { generation: g, data };
      // Superseded and removed while we read: the metadata now names a newer one.
      if (this.#meta.blobs[k] === g) throw new StoreError('MISSING_BLOB', `blob ${blobName(instance, kind, g)} named by the metadata is missing`);
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
      const done = (): void => {
        clearTimeout(timer);
        this.#gathered = null;
        resolve();
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
        // Those queued meanwhile, plus the ones just acknowledged, who are likely to be back at once.
        if (this.#queue.length > 0) await this.#gather(this.#queue.length + batch.length);
      }
    } finally {
      this.#running = null;
    }
  }

  async #commit(batch: Op[]): Promise<void> {
    const blobs = { ...this.#meta.blobs };
    const writes = new Map<string, { name: string; data: Uint8Array }>();
    let saves = 0;
    for (const op of batch) {
      if (op.type === 'save') {
        const k = key(op.instance, op.kind);
        saves++;
        if (writes.has(k)) this.stats.coalesced++;
        blobs[k] = op.generation;
        writes.set(k, { name: blobName(op.instance, op.kind, op.generation), data: op.data });
      } else if (op.type === 'remove') {
        for (const kind of op.kinds) {
          const k = key(op.instance, kind);
          delete blobs[k];
          writes.delete(k);
        }
      }
    }
    const next: MetaRecord = { format: 1, seq: this.#meta.seq + 1, clock: this.#meta.clock, blobs, table: this.snapshotTable() };
    try {
      await this.ops.commit([...writes.values()], encodeMeta(next, this.macKey));
    } catch (err) {
      const e = new StoreError('IO', `commit of ${batch.length} operations on ${this.ops.description} failed: ${(err as Error).message}`);
      for (const op of batch) op.done.reject(e);
      return;
    }
    const old = this.#meta.blobs;
    // clock may have advanced while we wrote (reservations for the next batch): keep the larger.
    this.#meta = { ...next, clock: this.#meta.clock };
    this.stats.commits++;
    this.stats.saves += saves;
    for (const op of batch) op.done.resolve();
    const stale: string[] = [];
    for (const [k, g] of Object.entries(old)) {
      if (blobs[k] === g) continue;
      const [i, kind] = k.split('.') as [string, StateKind];
      stale.push(blobName(Number(i), kind, g));
    }
    if (stale.length) await this.ops.removeBlobs(stale).catch(() => undefined);
  }

  /** Waits for every queued operation to be committed (used at shutdown). */
  async flush(): Promise<void> {
    while (this.#running) await this.#running.catch(() => undefined);
  }
}
