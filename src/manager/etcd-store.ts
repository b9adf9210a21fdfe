// The manager's state in an etcd cluster, shared by every host of it. etcd holds only ciphertext: the
// sealed blobs as seal.ts makes them, and each VM's record (its VM-table entry and the generation of
// each live blob) AES-256-GCM-sealed under a key derived from the metadata key. Keys (docs/cluster.md):
//
//   P/keycheck           a sealed constant: a host with another master key refuses to start
//   P/vm/<id>            sealed { vm: VmRecord, gens: { kind: generation } }
//   P/blob/<inst>/<kind> sealed blob (seal.ts)
//   P/inst/<inst>        the id of the VM that owns an instance number (numbers are cluster-wide)
//   P/claim/<id>         the holder's host name, bound to its lease (etcd-claims.ts)
//   P/host/<host>/migration  that host's sealed migration record (keys, counters)
//
// <id> is HMAC-SHA256(metadata key, "etcd vm" ‖ uuid), first 16 bytes in hex: etcd sees no VM uuid.
//
// Group commit: the saves read in one turn of the event loop share a transaction (up to MAX_VMS VMs and
// MAX_BYTES, inside etcd's defaults); up to MAX_INFLIGHT transactions of disjoint VMs fly at once, so a
// VM's writes are applied in order, and a table change runs alone. Each transaction is conditioned on the
// claim of every VM it writes still carrying the lease this host claimed it under; it is acknowledged
// once etcd committed it, i.e. a quorum has it in its log. A transaction whose condition fails is split
// by VM: fenced VMs' saves are refused, the others go again.
import crypto from 'node:crypto';
import { CompareResult, CompareTarget, type Etcd3, type ICompare, type IRequestOp } from 'etcd3';
import type { StateKind } from '../tpm/state-store.js';
import { Claims, EtcdStoreError, connect, parseEtcdUrl, putIfAbsent, unavailable, type EtcdTls } from './etcd-claims.js';
import { openRecord, sealRecord } from './etcd-record.js';
import type { StoreStats } from './store.js';
import { observeCommit } from './store-view.js';
import type { VmRecord } from './vm-table.js';
import type { VtpmStore } from './vm-store.js';

/** VMs per transaction: a blob put, a delete or two and the record each stay under etcd's 128 operations. */
const MAX_VMS = 40;
/** Blob bytes per transaction, under etcd's default 1.5 MiB request limit (--max-request-bytes). */
const MAX_BYTES = 1024 * 1024;
/** Transactions in flight at once (of disjoint VMs): etcd commits concurrent proposals in one raft round. */
const MAX_INFLIGHT = 4;
const KEYCHECK = 'vtpm-split cluster key check v1';

type Gens = Partial<Record<StateKind, number>>;
interface VmEntry {
  vm: VmRecord;
  gens: Gens;
}

type Op =
  | { type: 'save'; instance: number; kind: StateKind; generation: number; data: Uint8Array; done: Deferred }
  | { type: 'remove'; instance: number; kinds: readonly StateKind[]; done: Deferred }
  | { type: 'table'; done: Deferred };

type OpInput = Op extends infer T ? (T extends Op ? Omit<T, 'done'> : never) : never;

interface Deferred {
  resolve: () => void;
  reject: (e: Error) => void;
}

export interface EtcdStoreOptions {
  url: string;
  tls?: EtcdTls;
  /** This host's name in claims (unique in the cluster). */
  host: string;
  ttlSeconds: number;
  metaKey: Buffer;
  /** The VM table's record of an instance, as it is now. */
  vm: (instance: number) => VmRecord | undefined;
  /** The whole table and this host's migration record, as they are now. */
  snapshot: () => { vms: VmRecord[]; migration: unknown };
  log: (line: string) => void;
}

export class EtcdStore implements VtpmStore {
  readonly description: string;
  readonly stats: StoreStats = { commits: 0, saves: 0, coalesced: 0, checkpoints: 0, replayed: 0 };
  readonly claims: Claims;
  readonly #client: Etcd3;
  readonly #p: string;
  readonly #o: EtcdStoreOptions;
  #clock = 0;
  /**
   * What etcd holds for each VM as far as this host knows: the record JSON last written or read, its
   * generations, and etcd's revision of them (so an older read never replaces a newer write).
   */
  readonly #known = new Map<string, { json: string; gens: Gens; rev: bigint }>();
  #writtenMigration = '';
  #queue: Op[] = [];
  /** Instances with a transaction in flight: their next operations wait, so each VM's writes stay in order. */
  readonly #inflight = new Set<number>();
  #flying = 0;
  /** A table operation writes records of any VM: it runs alone. */
  #tableFlying = false;
  #scheduled = false;
  /** Called when a transaction ends (loads and flush wait on it). */
  #waiters: Array<() => void> = [];
  /** VM records that do not open (edited, damaged): key name → why. Those VMs are refused, never made anew. */
  readonly #damaged = new Map<string, string>();
  /** Instances with operations queued or in flight (a load waits for them). */
  readonly #pending = new Map<number, number>();

  private constructor(o: EtcdStoreOptions, client: Etcd3, prefix: string) {
    this.#o = o;
    this.#client = client;
    this.#p = prefix;
    this.description = o.url;
    const idKey = Buffer.from(crypto.hkdfSync('sha256', o.metaKey, Buffer.alloc(0), Buffer.from('etcd vm id', 'ascii'), 32));
    this.vmId = (uuid) => crypto.createHmac('sha256', idKey).update(uuid).digest().subarray(0, 16).toString('hex');
    this.claims = new Claims(client, prefix, o.host, o.ttlSeconds, o.log, this.vmId);
  }

  /** A VM's name in etcd keys. */
  readonly vmId: (vmUuid: string) => string;

  #key(...parts: Array<string | number>): Buffer {
    return Buffer.from(this.#p + parts.join('/'));
  }

  /** Connects, checks the master key against the cluster's, and reads the VM table and this host's migration record. */
  static async open(o: EtcdStoreOptions): Promise<{ store: EtcdStore; table: { vms: VmRecord[]; migration: unknown } }> {
    const target = parseEtcdUrl(o.url);
    const client = connect(target, o.tls);
    const s = new EtcdStore(o, client, target.prefix);
    try {
      await s.#checkKey();
      const vms = await s.readTable();
      const ids = new Map(vms.map((v) => [s.vmId(v.vmUuid), v.vmUuid]));
      const adopted = await s.claims.adoptOwn((id) => ids.get(id));
      if (adopted.length) o.log(`took over ${adopted.length} claims this host's previous manager held`);
      const mig = await s.#get(s.#key('host', o.host, 'migration'));
      const migration = mig ? openRecord(o.metaKey, `host/${o.host}/migration`, mig) : null;
      s.#writtenMigration = JSON.stringify(migration);
      return { store: s, table: { vms, migration } };
    } catch (err) {
      client.close();
      throw err;
    }
  }

  async #get(key: Buffer): Promise<Buffer | null> {
    try {
      const r = await this.#client.kv.range({ key });
      return r.kvs[0]?.value ?? null;
    } catch (err) {
      throw unavailable(err, `reading ${key.toString()}`);
    }
  }

  async #checkKey(): Promise<void> {
    const key = this.#key('keycheck');
    let kv;
    try {
      kv = await putIfAbsent(this.#client, key, sealRecord(this.#o.metaKey, 'keycheck', KEYCHECK));
    } catch (err) {
      throw unavailable(err, `connecting to ${this.#o.url}`);
    }
    if (!kv) return;
    try {
      if (openRecord(this.#o.metaKey, 'keycheck', kv.value) === KEYCHECK) return;
    } catch {
      // below
    }
    throw new EtcdStoreError('KEY_MISMATCH', `the master key does not open ${this.#p}keycheck: every host of ${this.#o.url} must use the same --master-key file`);
  }

  /** Every VM record in the cluster (another host may have added or changed some since the last read). */
  async readTable(): Promise<VmRecord[]> {
    const from = this.#key('vm', '');
    let r;
    try {
      r = await this.#client.kv.range({ key: from, range_end: this.#key('vm' + String.fromCharCode('/'.charCodeAt(0) + 1)) });
    } catch (err) {
      throw unavailable(err, 'reading the VM table');
    }
    const vms: VmRecord[] = [];
    const damaged = new Map<string, string>();
    for (const kv of r.kvs) {
      const name = kv.key.toString().slice(this.#p.length);
      let e: VmEntry;
      try {
        e = openRecord(this.#o.metaKey, name, kv.value) as VmEntry;
      } catch (err) {
        // One damaged record costs its own VM, not every OPEN in the cluster.
        if (!this.#damaged.has(name)) this.#o.log(`${(err as Error).message}; that VM is refused until the record is repaired or deleted`);
        damaged.set(name, (err as Error).message);
        continue;
      }
      vms.push(e.vm);
      const rev = BigInt(kv.mod_revision);
      if (rev > (this.#known.get(e.vm.vmUuid)?.rev ?? -1n)) this.#known.set(e.vm.vmUuid, { json: JSON.stringify(e.vm), gens: e.gens, rev });
      for (const g of Object.values(e.gens)) this.#clock = Math.max(this.#clock, g ?? 0);
    }
    this.#damaged.clear();
    for (const [k, v] of damaged) this.#damaged.set(k, v);
    return vms;
  }

  /** Refuses a VM whose record is in etcd but does not open: it must not pass for a VM with no state. */
  checkNotDamaged(vmUuid: string): void {
    const why = this.#damaged.get(`vm/${this.vmId(vmUuid)}`);
    if (why) throw new EtcdStoreError('FORMAT', `vm ${vmUuid}: ${why}`);
  }

  /** Takes `instance` for `vmUuid` cluster-wide (false: another VM has it). Repeatable. */
  async reserveInstance(instance: number, vmUuid: string): Promise<boolean> {
    const key = this.#key('inst', instance);
    try {
      const kv = await putIfAbsent(this.#client, key, Buffer.from(this.vmId(vmUuid)));
      return !kv || kv.value.toString() === this.vmId(vmUuid);
    } catch (err) {
      throw unavailable(err, `reserving instance ${instance}`);
    }
  }

  reserve(): number {
    return ++this.#clock;
  }

  save(instance: number, kind: StateKind, generation: number, data: Uint8Array): Promise<void> {
    return this.#enqueue({ type: 'save', instance, kind, generation, data });
  }

  remove(instance: number, kinds: readonly StateKind[] = ['permanent', 'volatile', 'savestate']): Promise<void> {
    return this.#enqueue({ type: 'remove', instance, kinds });
  }

  commitTable(): Promise<void> {
    return this.#enqueue({ type: 'table' });
  }

  /** The VM's record and blob at one revision; only the claim holder reads (it is the only writer). */
  async load(instance: number, kind: StateKind): Promise<{ generation: number; data: Buffer } | null> {
    const vm = this.#o.vm(instance);
    if (!vm) throw new EtcdStoreError('FORMAT', `no VM record for instance ${instance}`);
    if (!this.claims.leaseOf(vm.vmUuid)) throw this.claims.forget(vm.vmUuid, undefined);
    // Queued and in-flight saves of this VM first: a load returns what was acknowledged last.
    while (this.#pending.has(instance)) await this.#settled();
    let r;
    try {
      r = await this.#client.kv.txn({ success: [{ request_range: { key: this.#key('vm', this.vmId(vm.vmUuid)) } }, { request_range: { key: this.#key('blob', instance, kind) } }] });
    } catch (err) {
      throw unavailable(err, `loading ${kind} state of instance ${instance}`);
    }
    const rec = r.responses[0]?.response_range.kvs[0];
    if (!rec) return null;
    const e = openRecord(this.#o.metaKey, `vm/${this.vmId(vm.vmUuid)}`, rec.value) as VmEntry;
    const g = e.gens[kind];
    if (g === undefined) return null;
    const blob = r.responses[1]?.response_range.kvs[0];
    if (!blob) throw new EtcdStoreError('FORMAT', `etcd key ${this.#p}blob/${instance}/${kind} named by vm ${vm.vmUuid}'s record (generation ${g}) is missing`);
    return { generation: g, data: blob.value };
  }

  /** DELETE: the VM's record, blobs, instance number and claim, in one transaction conditioned on the claim. */
  async deleteVm(vmUuid: string, instance: number): Promise<void> {
    await this.flush();
    const lease = this.claims.leaseOf(vmUuid);
    if (!lease) throw this.claims.forget(vmUuid, undefined);
    const claim = this.claims.claimKey(vmUuid);
    const blobs = this.#key('blob', instance, '');
    let r;
    try {
      r = await this.#client.kv.txn({
        compare: [{ key: claim, target: CompareTarget.Lease, result: CompareResult.Equal, lease }],
        success: [
          { request_delete_range: { key: this.#key('vm', this.vmId(vmUuid)) } },
          { request_delete_range: { key: blobs, range_end: this.#key('blob', instance + '0') } },
          { request_delete_range: { key: this.#key('inst', instance) } },
          { request_delete_range: { key: claim } },
        ],
        failure: [{ request_range: { key: claim } }],
      });
    } catch (err) {
      throw unavailable(err, `deleting vm ${vmUuid}`);
    }
    if (!r.succeeded) throw this.claims.forget(vmUuid, r.responses[0]?.response_range.kvs[0]);
    this.#known.delete(vmUuid);
    await this.claims.release(vmUuid).catch(() => undefined);
  }

  #enqueue(op: OpInput): Promise<void> {
    const inst = op.type === 'table' ? -1 : op.instance;
    this.#pending.set(inst, (this.#pending.get(inst) ?? 0) + 1);
    let settled = false;
    const release = (): void => {
      if (settled) return;
      settled = true;
      const n = this.#pending.get(inst)! - 1;
      if (n === 0) this.#pending.delete(inst);
      else this.#pending.set(inst, n);
    };
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ ...op, done: { resolve: () => (release(), resolve()), reject: (e) => (release(), reject(e)) } });
      if (!this.#scheduled) {
        // Once per turn of the event loop: the requests read in this poll phase join one batch.
        this.#scheduled = true;
        setImmediate(() => {
          this.#scheduled = false;
          this.#pump();
          if (this.#flying === 0) for (const w of this.#waiters.splice(0)) w();
        });
      }
    });
  }

  #settled(): Promise<void> {
    return new Promise((r) => this.#waiters.push(r));
  }

  /** Starts transactions while there is room: queued operations of VMs not in flight, in order. */
  #pump(): void {
    while (this.#flying < MAX_INFLIGHT && !this.#tableFlying && this.#queue.length > 0) {
      const batch = this.#take();
      if (batch.length === 0) return;
      const table = batch[0]!.type === 'table';
      const insts = new Set(batch.flatMap((op) => (op.type === 'table' ? [] : [op.instance])));
      for (const i of insts) this.#inflight.add(i);
      this.#flying++;
      if (table) this.#tableFlying = true;
      void this.#commit(batch)
        // Whatever goes wrong answers this batch's callers; the queue behind it goes on.
        .catch((err: unknown) => {
          for (const op of batch) op.done.reject(err instanceof Error ? err : new Error(String(err)));
        })
        .finally(() => {
          this.#flying--;
          if (table) this.#tableFlying = false;
          for (const i of insts) this.#inflight.delete(i);
          for (const w of this.#waiters.splice(0)) w();
          this.#pump();
        });
    }
  }

  /**
   * The next batch: a table operation alone once nothing is in flight; otherwise, from the head of the
   * queue up to the first table operation, the operations of VMs not in flight, as many as fit one
   * transaction. Taken out of the queue; what stays keeps its order.
   */
  #take(): Op[] {
    if (this.#queue[0]!.type === 'table') return this.#flying === 0 ? this.#queue.splice(0, 1) : [];
    const vms = new Set<number>();
    const take: number[] = [];
    let bytes = 0;
    for (let n = 0; n < this.#queue.length; n++) {
      const op = this.#queue[n]!;
      if (op.type === 'table') break;
      if (this.#inflight.has(op.instance)) continue;
      if (!vms.has(op.instance) && vms.size >= MAX_VMS) break;
      if (op.type === 'save') {
        if (take.length > 0 && bytes + op.data.length > MAX_BYTES) break;
        bytes += op.data.length;
      }
      vms.add(op.instance);
      take.push(n);
    }
    const batch = take.map((n) => this.#queue[n]!);
    const picked = new Set(take);
    this.#queue = this.#queue.filter((_, n) => !picked.has(n));
    return batch;
  }

  async #commit(batch: Op[]): Promise<void> {
    // Per VM: its new generations, the blob writes and deletes (a later save of a blob replaces an
    // earlier one), the operations waiting on it.
    const per = new Map<string, { vm: VmRecord; gens: Gens; blobs: Map<StateKind, Uint8Array | null>; ops: Op[] }>();
    const entry = (vm: VmRecord) => {
      let e = per.get(vm.vmUuid);
      if (!e) per.set(vm.vmUuid, (e = { vm, gens: { ...(this.#known.get(vm.vmUuid)?.gens ?? {}) }, blobs: new Map(), ops: [] }));
      return e;
    };
    const general: Op[] = [];
    let saves = 0;
    let migration: string | null = null;
    for (const op of batch) {
      if (op.type === 'table') {
        const snap = this.#o.snapshot();
        // Only VMs this host holds are its to write; a record changed here after its claim was lost stays unwritten.
        for (const vm of snap.vms) if (this.claims.leaseOf(vm.vmUuid) && this.#known.get(vm.vmUuid)?.json !== JSON.stringify(vm)) entry(vm).ops.push(op);
        const m = JSON.stringify(snap.migration);
        if (m !== this.#writtenMigration) migration = m;
        general.push(op);
        continue;
      }
      const vm = this.#o.vm(op.instance);
      if (!vm) {
        op.done.reject(new EtcdStoreError('FORMAT', `no VM record for instance ${op.instance}`));
        continue;
      }
      const e = entry(vm);
      e.ops.push(op);
      if (op.type === 'save') {
        saves++;
        if (e.blobs.has(op.kind)) this.stats.coalesced++;
        e.blobs.set(op.kind, op.data);
        e.gens[op.kind] = op.generation;
      } else
        for (const k of op.kinds) {
          e.blobs.set(k, null);
          delete e.gens[k];
        }
    }
    // VMs this host does not hold: their operations are refused before anything is sent.
    const failed = new Map<Op, Error>();
    for (const [uuid, e] of per) {
      if (this.claims.leaseOf(uuid)) continue;
      const err = this.claims.forget(uuid, undefined);
      for (const op of e.ops) failed.set(op, err);
      per.delete(uuid);
    }
    const compare: ICompare[] = [];
    const success: IRequestOp[] = [];
    const written = new Map<string, string>();
    for (const [uuid, e] of per) {
      compare.push({ key: this.claims.claimKey(uuid), target: CompareTarget.Lease, result: CompareResult.Equal, lease: this.claims.leaseOf(uuid)! });
      for (const [kind, data] of e.blobs) {
        const key = this.#key('blob', e.vm.instance, kind);
        success.push(data ? { request_put: { key, value: Buffer.from(data.buffer, data.byteOffset, data.byteLength) } } : { request_delete_range: { key } });
      }
      written.set(uuid, JSON.stringify(e.vm));
      const id = this.vmId(uuid);
      success.push({ request_put: { key: this.#key('vm', id), value: sealRecord(this.#o.metaKey, `vm/${id}`, { vm: e.vm, gens: e.gens }) } });
    }
    if (migration !== null) success.push({ request_put: { key: this.#key('host', this.#o.host, 'migration'), value: sealRecord(this.#o.metaKey, `host/${this.#o.host}/migration`, JSON.parse(migration)) } });
    const settle = (): void => {
      for (const op of batch) {
        const err = failed.get(op);
        if (err) op.done.reject(err);
        else op.done.resolve();
      }
    };
    if (success.length === 0) return settle();
    let r;
    try {
      r = await this.#client.kv.txn({ compare, success, failure: [...per.keys()].map((uuid) => ({ request_range: { key: this.claims.claimKey(uuid) } })) });
    } catch (err) {
      const e = unavailable(err, `committing ${batch.length} operations`);
      for (const op of batch) op.done.reject(failed.get(op) ?? e);
      return;
    }
    if (r.succeeded) {
      for (const [uuid, e] of per) {
        this.#known.set(uuid, { json: written.get(uuid)!, gens: e.gens, rev: BigInt(r.header.revision) });
      }
      if (migration !== null) this.#writtenMigration = migration;
      this.stats.commits++;
      this.stats.saves += saves;
      observeCommit('etcd', batch.length, saves);
      return settle();
    }
    // Some claim is no longer ours: those VMs' operations are refused, the rest go again in order.
    let i = 0;
    const again: Op[] = [];
    for (const [uuid, e] of per) {
      const kv = r.responses[i++]?.response_range.kvs[0];
      if (kv?.lease === this.claims.leaseOf(uuid)) continue;
      const err = this.claims.forget(uuid, kv);
      for (const op of e.ops) failed.set(op, err);
    }
    for (const op of batch) {
      const err = failed.get(op);
      if (err) op.done.reject(err);
      else again.push(op);
    }
    // Ahead of everything queued meanwhile (those VMs were in flight, so nothing of theirs overtook).
    this.#queue.unshift(...again);
  }

  async flush(): Promise<void> {
    while (this.#flying > 0 || this.#queue.length > 0 || this.#scheduled) await this.#settled();
  }

  /** Commits what is queued, gives up every claim (revokes the lease) and disconnects. */
  async close(): Promise<void> {
    try {
      await this.flush();
      await this.claims.close();
    } finally {
      this.#client.close();
    }
  }
}
