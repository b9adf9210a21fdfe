// A directory-backed StateStore, for tests and standalone use (the manager supplies the production one;
// a vTPM-domain process with --state-dir uses this one for its single instance). One file per
// (instance, kind), <dir>/tpm-<instance>.<kind>, in the two-slot format of slot-file.ts.
//
// Why two slots. Writing a temp file, fdatasync, renaming it over the old one and fsyncing the
// directory costs two journal commits, most of the time to a ready TPM. Overwriting the older of two
// preallocated slots in a file whose blocks were written once and whose size never changes needs one
// fdatasync and no metadata at all (ext4 commits no journal for it; the mtime change is not "data"):
// about half the time (docs/benchmarks.md, engine). The checksum in each slot lets load()
// reject a torn write and fall back to the other slot, which holds the last acknowledged state.
//
// Why spare files. A new (instance, kind) needs a new file, and a new name is only durable after a
// directory fsync. So the store keeps a few spare files ready (`spares`, default 2) in <dir>/.spare/,
// made ahead of time off the critical path: written whole, fsynced, and the directory fsynced, each
// holding a valid SPARE record in slot 0. Claiming one writes the state with its identity (instance,
// kind) into slot 1, hard-links it to its name (link, not rename: it fails if the name exists) and
// unlinks the spare name (both only in the page cache and dentries, ~20 µs on the JS thread), then one
// fdatasync. If a crash loses the link, the file is still in .spare/ with its identity inside, and the
// next store to use the directory (recovery, on first use) links it into place. Spare names carry the
// boot id, pid and a per-store tag so recovery only touches files of stores that are gone.
//
// Other ways we did not take: one store-wide append log with group commit (what src/manager/wal.ts
// does) needs the same preallocation for fdatasync to stay cheap, plus checkpointing and a full replay
// on open; for one TPM's few writes at a time it buys nothing over the slots. A worker thread doing
// every call synchronously: one message round trip, but ~10 MiB per process; not used.
//
// The synchronous calls (open, pwrite, link, unlink, stat) only touch the page cache and the
// directory (~30–40 µs together); only fdatasync/fsync and reads of existing files go to the pool. On a
// filesystem where those can stall (NFS, FUSE) they would stall the event loop: keep this store's
// directory on a local filesystem. One store object writes a given instance's state at a time (the
// slot choice is remembered in memory); several may read.
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { join } from 'node:path';
import {
  DEFAULT_SLOT_CAP,
  RecordType,
  SLOT_HEADER_SIZE,
  SlotFileError,
  capFor,
  encodeFile,
  encodeRecord,
  parseSlotFile,
  stateOf,
} from './slot-file.js';
import { STATE_KINDS, type StateKind, type StateStore } from './state-store.js';

export { SlotFileError } from './slot-file.js';

const { O_WRONLY, O_CREAT, O_TRUNC, O_EXCL, O_RDONLY, O_DIRECTORY } = fs.constants;

export interface DirStoreOptions {
  /**
   * Spare files to keep ready (default 2). A state kind stored for the first time takes one and costs
   * one fdatasync; with none left (or 0) it costs a temp file, rename and directory fsync instead.
   */
  spares?: number;
}

/** Where the newest record of a slot file is: the next write goes to the other slot. */
interface SlotState {
  cap: number;
  slot: 0 | 1;
  seq: bigint;
}

interface Spare {
  path: string;
  cap: number;
  seq: bigint;
  /** Kept open from its making to its claim (one open less on the claim's path); null after close(). */
  fd: number | null;
}

export const SPARE_DIR = '.spare';
/** A refill starts this long after the claim that asked for it, off the claiming write's path. */
const REFILL_DELAY_MS = 3;
const REFILL_MAX_DEFER_MS = 50;
const DEFAULT_SPARES = 2;

/** One fs callback call as a promise (cheaper than fs/promises, which wraps every fd in a FileHandle). */
function call<T>(fn: (...args: never[]) => void, ...args: unknown[]): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    (fn as (...a: unknown[]) => void)(...args, (err: NodeJS.ErrnoException | null, v: T) => (err ? reject(err) : resolve(v)));
  });
}

function writeAll(fd: number, buf: Uint8Array, pos: number): void {
  let off = 0;
  while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off, pos + off);
}

async function writeAllAsync(fd: number, buf: Uint8Array): Promise<void> {
  let off = 0;
  while (off < buf.length) off += await call<number>(fs.write, fd, buf, off, buf.length - off, off);
}

function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').replace(/[^0-9a-f]/g, '').slice(0, 12) || 'noboot';
  } catch {
    return 'noboot';
  }
}

const BOOT = bootId();
/** Tags of the stores in this process: their spare files are in use, recovery leaves them alone. */
const liveTags = new Set<string>();

function ownerAlive(name: string): boolean {
  const m = /^([0-9a-z]+)-(\d+)-([0-9a-f]+)-\d+$/.exec(name);
  if (!m || m[1] !== BOOT) return false;
  const pid = Number(m[2]);
  if (pid === process.pid) return liveTags.has(m[3]!);
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class DirStateStore implements StateStore {
  #seq = 0;
  /** The directory, open for fsync after renames and unlinks: opened on first use, kept (one fd). */
  #dirFd: number | null = null;
  readonly #spareTarget: number;
  readonly #tag = randomBytes(4).toString('hex');
  #spares: Spare[] = [];
  #spareCount = 0;
  #recovered = false;
  #refilling: Promise<void> | null = null;
  #refillTimer: NodeJS.Timeout | null = null;
  /** close() was called: no more refills. */
  #closed = false;
  /** Names linked into the directory since its last fsync (claims, recovery). */
  #dirDirty = false;
  /**
   * What this store knows of each file it touched: where the newest slot is, that it is of the first
   * format, or that load() just found none ('absent': a first write then claims a spare without
   * another stat; link() refuses a name that exists, so a stale 'absent' clobbers nothing). Not in the
   * map: look at the file before the first write.
   */
  readonly #slots = new Map<string, SlotState | 'legacy' | 'absent'>();
  /** Per path, the last operation: operations on one file run one after another. */
  readonly #chains = new Map<string, Promise<unknown>>();

  constructor(
    readonly dir: string,
    opts: DirStoreOptions = {},
  ) {
    const n = opts.spares ?? DEFAULT_SPARES;
    if (!Number.isInteger(n) || n < 0 || n > 64) throw new RangeError(`bad spares count ${n}`);
    this.#spareTarget = n;
    liveTags.add(this.#tag);
  }

  /** Creates the directory if needed, recovers what a crash left in it, and makes its spare files. */
  static async open(dir: string, opts: DirStoreOptions = {}): Promise<DirStateStore> {
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    const store = new DirStateStore(dir, opts);
    await store.sparesReady();
    return store;
  }

  path(instance: number, kind: StateKind): string {
    if (!Number.isInteger(instance) || instance < 0) throw new RangeError(`bad instance number ${instance}`);
    if (!STATE_KINDS.includes(kind)) throw new RangeError(`bad state kind ${String(kind)}`);
    return join(this.dir, `tpm-${instance}.${kind}`);
  }

  /** Spare files ready now. */
  get spareCount(): number {
    return this.#spares.length;
  }

  /** Resolves once the spare files are at their target; rejects if one cannot be made. */
  async sparesReady(): Promise<void> {
    this.#init();
    while (this.#spares.length < this.#spareTarget) await this.#refill();
  }

  /**
   * The newest valid record. A missing file is answered from a stat on the JS thread (a new TPM's three
   * loads then cost no pool round trip); an existing one is read on the pool (it may not be cached).
   */
  async load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    const file = this.path(instance, kind);
    this.#init();
    return this.#serial(file, async () => {
      if (!fs.statSync(file, { throwIfNoEntry: false })) {
        this.#slots.set(file, 'absent');
        return null;
      }
      return this.#read(file, instance, kind);
    });
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    const file = this.path(instance, kind);
    this.#init();
    return this.#serial(file, async () => {
      try {
        await this.#write(file, instance, kind, blob);
      } catch (err) {
        // What is on disk is unknown now: read it again before the next write.
        this.#slots.delete(file);
        throw err;
      }
    });
  }

  async delete(instance: number, kind: StateKind): Promise<void> {
    const file = this.path(instance, kind);
    this.#init();
    return this.#serial(file, async () => {
      this.#slots.delete(file);
      try {
        fs.unlinkSync(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw err;
      }
      await call<void>(fs.fsync, this.#dir());
    });
  }

  /**
   * Closes the directory fd kept for fsyncs and stops refills for good (a later write takes the slow
   * path); call when no operation is under way. A refill left running would make `.spare` again under
   * whoever removes the directory next.
   */
  close(): void {
    this.#closed = true;
    for (const sp of this.#spares) {
      if (sp.fd !== null) fs.closeSync(sp.fd);
      sp.fd = null;
    }
    if (this.#refillTimer) clearTimeout(this.#refillTimer);
    this.#refillTimer = null;
    if (this.#dirFd !== null) fs.closeSync(this.#dirFd);
    this.#dirFd = null;
  }

  #serial<T>(key: string, op: () => Promise<T>): Promise<T> {
    const prev = this.#chains.get(key);
    // Nothing before it: start now, not a microtask later.
    const run = prev ? prev.then(op, op) : op();
    const tail = run.catch(() => undefined);
    this.#chains.set(key, tail);
    void tail.then(() => {
      if (this.#chains.get(key) === tail) this.#chains.delete(key);
    });
    return run;
  }

  async #read(file: string, instance: number, kind: StateKind): Promise<Uint8Array | null> {
    let buf: Buffer;
    try {
      buf = await call<Buffer>(fs.readFile, file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
    const parsed = parseSlotFile(new Uint8Array(buf.buffer, buf.byteOffset, buf.length), file);
    if (parsed.format === 'legacy') {
      this.#slots.set(file, 'legacy');
      return new Uint8Array(parsed.blob);
    }
    const { cap, slot, record } = parsed.content;
    const state = stateOf(parsed.content, instance, kind, file);
    this.#slots.set(file, { cap, slot, seq: record.seq });
    return state;
  }

  async #write(file: string, instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    if (!this.#slots.has(file) && fs.statSync(file, { throwIfNoEntry: false })) await this.#read(file, instance, kind);
    const known = this.#slots.get(file);
    const need = SLOT_HEADER_SIZE + blob.length;
    if (typeof known === 'object' && need <= known.cap) return this.#overwrite(file, known, instance, kind, blob);
    if (known === undefined || known === 'absent') {
      const i = this.#spares.findIndex((s) => need <= s.cap);
      if (i >= 0) return this.#claim(file, this.#spares.splice(i, 1)[0]!, instance, kind, blob);
    }
    return this.#replace(file, known, instance, kind, blob);
  }

  /** The common case: the older slot of an existing file, one fdatasync. */
  async #overwrite(file: string, known: SlotState, instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    const slot = known.slot === 0 ? 1 : 0;
    const seq = known.seq + 1n;
    const rec = encodeRecord(known.cap, { type: RecordType.BLOB, kind, instance, seq, payload: blob });
    const fd = fs.openSync(file, O_WRONLY);
    try {
      writeAll(fd, rec, slot * known.cap);
      await call<void>(fs.fdatasync, fd);
    } finally {
      fs.closeSync(fd);
    }
    this.#slots.set(file, { cap: known.cap, slot, seq });
  }

  /** A first write: a spare file takes the state into slot 1 and its name, one fdatasync. */
  async #claim(file: string, spare: Spare, instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    const seq = spare.seq + 1n;
    const rec = encodeRecord(spare.cap, { type: RecordType.BLOB, kind, instance, seq, payload: blob });
    const fd = spare.fd ?? fs.openSync(spare.path, O_WRONLY);
    let synced: Promise<void>;
    try {
      writeAll(fd, rec, spare.cap);
      fs.linkSync(spare.path, file);
      synced = call<void>(fs.fdatasync, fd);
    } catch (err) {
      // EEXIST from link: the name appeared since we looked (another writer). Either way this spare
      // may now name an instance, so it cannot go back to the pool.
      fs.closeSync(fd);
      removeQuietly(spare.path);
      throw err;
    }
    // While the pool syncs: drop the spare name (two names for one file are harmless, recovery
    // removes the spare one) and arrange the refill.
    removeQuietly(spare.path);
    this.#dirDirty = true;
    this.#scheduleRefill();
    try {
      await synced;
    } finally {
      fs.closeSync(fd);
    }
    this.#slots.set(file, { cap: spare.cap, slot: 1, seq });
  }

  /**
   * A whole new file by temp + rename + directory fsync: a first write with no spare left, a blob that
   * outgrew its slots, or a file of the first format (converted by this write).
   */
  async #replace(file: string, known: SlotState | 'legacy' | 'absent' | undefined, instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    const seq = typeof known === 'object' ? known.seq + 1n : 1n;
    const cap = capFor(blob.length);
    const image = encodeFile(cap, { type: RecordType.BLOB, kind, instance, seq, payload: blob });
    const tmp = `${file}.tmp-${process.pid}-${++this.#seq}`;
    const dirFd = this.#dir();
    const fd = fs.openSync(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o600);
    try {
      writeAll(fd, image, 0);
      // Data only: the file's size counts as data for fdatasync; its times do not matter for recovery.
      await call<void>(fs.fdatasync, fd);
    } catch (err) {
      fs.closeSync(fd);
      removeQuietly(tmp);
      throw err;
    }
    fs.closeSync(fd);
    try {
      fs.renameSync(tmp, file);
    } catch (err) {
      removeQuietly(tmp);
      throw err;
    }
    await call<void>(fs.fsync, dirFd);
    this.#slots.set(file, { cap, slot: 0, seq });
  }

  #dir(): number {
    this.#dirFd ??= fs.openSync(this.dir, O_RDONLY | O_DIRECTORY);
    return this.#dirFd;
  }

  /**
   * First use: files a crashed store left in .spare/. A claimed one (a BLOB record inside) whose link
   * was lost goes to its name; an unclaimed or half-made one is removed. Files of live stores stay.
   */
  #init(): void {
    if (this.#recovered) return;
    this.#recovered = true;
    const sdir = join(this.dir, SPARE_DIR);
    let names: string[] = [];
    try {
      names = fs.readdirSync(sdir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    for (const name of names) {
      if (ownerAlive(name)) continue;
      const path = join(sdir, name);
      let parsed;
      try {
        parsed = parseSlotFile(fs.readFileSync(path), path);
      } catch (err) {
        // Made but never completed: nothing was ever acknowledged from it. Anything else we cannot
        // read (not ours) stays where it is.
        if (err instanceof SlotFileError) removeQuietly(path);
        continue;
      }
      const r = parsed.format === 'slots' ? parsed.content.record : null;
      if (!r || r.type !== RecordType.BLOB || !r.kind) {
        removeQuietly(path);
        continue;
      }
      const final = this.path(r.instance, r.kind);
      const there = fs.statSync(final, { throwIfNoEntry: false });
      if (!there) {
        fs.renameSync(path, final);
        this.#dirDirty = true;
      } else if (there.ino === fs.statSync(path).ino) {
        removeQuietly(path); // killed between link and unlink
      }
      // A different file under that name was written after this claim's link was lost: it is the
      // newer state. This one stays in .spare/ (never read again) rather than being thrown away.
    }
    this.#scheduleRefill(); // spares to make; the refill also makes names linked above durable
  }

  /**
   * A refill waits while this store has operations under way (its fsyncs need journal commits, which
   * would queue in front of their fdatasyncs on the same device), for at most REFILL_MAX_DEFER_MS.
   */
  #scheduleRefill(since = performance.now()): void {
    if (this.#closed || this.#refillTimer || this.#refilling || (this.#spares.length >= this.#spareTarget && !this.#dirDirty)) return;
    this.#refillTimer = setTimeout(() => {
      this.#refillTimer = null;
      if (this.#chains.size > 0 && performance.now() - since < REFILL_MAX_DEFER_MS) return this.#scheduleRefill(since);
      this.#refill().catch(() => undefined); // the next claim falls back to the slow path, and retries
    }, REFILL_DELAY_MS);
    this.#refillTimer.unref();
  }

  /** Makes spare files up to the target (one at a time, only one refill at once), then syncs names. */
  #refill(): Promise<void> {
    this.#refilling ??= this.#makeSpares().finally(() => {
      this.#refilling = null;
      if (this.#spares.length < this.#spareTarget || this.#dirDirty) this.#scheduleRefill();
    });
    return this.#refilling;
  }

  async #makeSpares(): Promise<void> {
    const sdir = join(this.dir, SPARE_DIR);
    const made: Spare[] = [];
    if (this.#spares.length < this.#spareTarget) {
      let created = false;
      try {
        await call<void>(fs.mkdir, sdir, { mode: 0o700 });
        created = true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      // The .spare entry itself must be durable before a file in it counts as made.
      if (created) await this.#fsyncDir(this.dir);
      const image = encodeFile(DEFAULT_SLOT_CAP, { type: RecordType.SPARE, kind: null, instance: 0, seq: 1n, payload: new Uint8Array(0) });
      while (this.#spares.length + made.length < this.#spareTarget) {
        const path = join(sdir, `${BOOT}-${process.pid}-${this.#tag}-${++this.#spareCount}`);
        const fd = await call<number>(fs.open, path, O_WRONLY | O_CREAT | O_EXCL, 0o600);
        try {
          // Every block written (no holes, no fallocate): later overwrites then change no metadata.
          await writeAllAsync(fd, image);
          await call<void>(fs.fsync, fd);
        } catch (err) {
          await call<void>(fs.close, fd);
          removeQuietly(path);
          throw err;
        }
        made.push({ path, cap: DEFAULT_SLOT_CAP, seq: 1n, fd });
      }
      try {
        await this.#fsyncDir(sdir);
      } catch (err) {
        for (const m of made) await call<void>(fs.close, m.fd!);
        throw err;
      }
      this.#spares.push(...made);
    }
    if (this.#dirDirty) {
      this.#dirDirty = false;
      await this.#fsyncDir(this.dir);
    }
  }

  /** A refill's own directory fd: close() may run meanwhile and close the kept one. */
  async #fsyncDir(path: string): Promise<void> {
    const fd = await call<number>(fs.open, path, O_RDONLY | O_DIRECTORY);
    try {
      await call<void>(fs.fsync, fd);
    } finally {
      await call<void>(fs.close, fd);
    }
  }
}

function removeQuietly(path: string): void {
  try {
    fs.unlinkSync(path);
  } catch {
    // Best effort: a leftover temp or spare file is never read as state.
  }
}
