// The manager's migration ordinals (GET_MIG_KEY, LOAD_MIG_KEY, MIGRATE_OUT, MIGRATE_IN) over the VM
// table, the store and the migration record the daemon keeps; the blob format and key codecs they use
// are in migration.ts (docs/migration.md).
import crypto from 'node:crypto';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import {
  MigrationError,
  createIdentity,
  decodeLoadMigKey,
  decodeMigrateIn,
  decodeMigrateOut,
  encodeMigKey,
  fingerprint,
  openIdentity,
  openMigration,
  publicKeyFrom,
  readBlobHeader,
  rsaPublicOf,
  sealForMigration,
  type Identity,
  type MigrationRecord,
  type StateBlobs,
} from './migration.js';
import { Refusal, type Reply } from './refusal.js';
import type { Sealer } from './seal.js';
import type { VtpmStore } from './vm-store.js';
import { MigType, type VmRecord, type VmTable } from './vm-table.js';
import { Startup, Status, encodeInstanceParam, type Frame, type StatusCode } from './wire.js';

export const MIGRATION_STATUS: Record<MigrationError['code'], StatusCode> = {
  BAD_FORMAT: Status.BAD_PARAMETER,
  BAD_KEY: Status.BAD_PARAMETER,
  WRONG_KEY: Status.DECRYPT_ERROR,
  TAMPERED: Status.DECRYPT_ERROR,
  KEY_STORE: Status.FAIL,
};

export interface MigrationContext {
  table: VmTable;
  store: VtpmStore;
  sealer: Sealer;
  /** The daemon's migration record, changed in place and committed with the table. */
  record: MigrationRecord;
  log: (line: string) => void;
  /** A VM's stored state of one kind, unsealed (null when there is none). */
  loadPlain: (vm: VmRecord, kind: StateKind) => Promise<Buffer | null>;
}

/** The migration handlers of one manager; privilege checks stay with the daemon's dispatch. */
export class MigrationHandlers {
  readonly table: VmTable;
  readonly store: VtpmStore;
  readonly sealer: Sealer;
  readonly record: MigrationRecord;
  readonly log: (line: string) => void;
  readonly loadPlain: (vm: VmRecord, kind: StateKind) => Promise<Buffer | null>;
  #identityP: Promise<Identity> | null = null;

  constructor(ctx: MigrationContext) {
    this.table = ctx.table;
    this.store = ctx.store;
    this.sealer = ctx.sealer;
    this.record = ctx.record;
    this.log = ctx.log;
    this.loadPlain = ctx.loadPlain;
  }

  /** This manager's migration key pair: made at first use, kept (private half encrypted) in the store. */
  identity(): Promise<Identity> {
    if (!this.#identityP) {
      const p = (async () => {
        const wrap = this.sealer.migrationKeyWrap();
        if (this.record.identity) return openIdentity(wrap, this.record.identity);
        const { identity, stored } = await createIdentity(wrap);
        this.record.identity = stored;
        try {
          await this.store.commitTable();
        } catch (err) {
          this.record.identity = null;
          throw err;
        }
        this.log(`created migration key ${short(identity.fingerprint)} (RSA-3072)`);
        return identity;
      })();
      this.#identityP = p;
      p.catch(() => {
        if (this.#identityP === p) this.#identityP = null;
      });
    }
    return this.#identityP;
  }

  /** GET_MIG_KEY: this manager's public migration key, in Xen's exponent/modulus layout. */
  async getMigKey(f: Frame): Promise<Reply> {
    if (f.params.length !== 0) throw new Refusal(Status.BAD_PARAMETER, `GET_MIG_KEY takes no parameters, got ${f.params.length} bytes`);
    const me = await this.identity();
    return { status: Status.SUCCESS, params: encodeMigKey(rsaPublicOf(me.publicKey)) };
  }

  /** LOAD_MIG_KEY: remembers a destination's public key under its name, durably. */
  async loadMigKey(f: Frame): Promise<Reply> {
    const { name, key } = decodeLoadMigKey(f.params);
    const pub = publicKeyFrom(key);
    const fp = fingerprint(pub).toString('hex');
    const before = this.record.destinations[name];
    this.record.destinations[name] = { spki: pub.export({ format: 'der', type: 'spki' }).toString('base64'), fingerprint: fp, loaded: new Date().toISOString() };
    try {
      await this.store.commitTable();
    } catch (err) {
      if (before) this.record.destinations[name] = before;
      else delete this.record.destinations[name];
      throw err;
    }
    const was = before && before.fingerprint !== fp ? ` (replacing ${before.fingerprint.slice(0, 16)}…)` : '';
    this.log(`loaded migration key "${name}" ${fp.slice(0, 16)}…${was}`);
    return { status: Status.SUCCESS };
  }

  /**
   * MIGRATE_OUT (source): the VM's stored state sealed to the named destination; the VM is marked
   * migrated first, so no save can slip in after the state was read, and stays so until DELETE. Asked
   * again for the same destination it re-issues the blob under the same counter (the reply was lost);
   * the destination takes at most one of them.
   */
  async migrateOut(f: Frame): Promise<Reply> {
    const req = decodeMigrateOut(f.params);
    const vm = req.vmUuid === null ? this.table.byInstance(req.instance) : this.table.byUuid(req.vmUuid);
    if (!vm) throw new Refusal(Status.BAD_PARAMETER, `MIGRATE_OUT of unknown ${req.vmUuid === null ? `instance ${req.instance}` : `vm ${req.vmUuid}`}`);
    const { instance } = vm;
    const { name } = req;
    if ((vm.migType ?? MigType.MIGRATABLE) === MigType.NON_MIGRATABLE)
      throw new Refusal(Status.BAD_PARAMETER, `instance ${instance} (vm ${vm.vmUuid}) was opened NON_MIGRATABLE (mig_type 0)`);
    const dest = this.record.destinations[name];
    if (!dest) throw new Refusal(Status.BAD_PARAMETER, `no migration key loaded under the name "${name}" (LOAD_MIG_KEY first)`);
    const me = await this.identity();
    if (dest.fingerprint === me.fingerprint.toString('hex')) throw new Refusal(Status.BAD_PARAMETER, `"${name}" is this manager's own migration key`);
    let counter: number;
    if (vm.status === 'migrated') {
      const to = vm.migratedTo!;
      if (to.keyFingerprint !== dest.fingerprint)
        throw new Refusal(
          Status.AUTHFAIL,
          `instance ${instance} (vm ${vm.vmUuid}) already went to "${to.name}" (key ${to.keyFingerprint.slice(0, 16)}…, counter ${to.counter}); only that destination can be sent it again`,
        );
      counter = to.counter;
    } else counter = (vm.migCounter ?? 0) + 1;
    const prev = { status: vm.status, migratedTo: vm.migratedTo, counter: this.record.counters[vm.vmUuid] };
    const at = new Date().toISOString();
    vm.status = 'migrated';
    vm.migratedTo = { name, keyFingerprint: dest.fingerprint, counter, at };
    this.record.counters[vm.vmUuid] = Math.max(prev.counter ?? 0, counter);
    let blob: Buffer;
    const states: StateBlobs = {};
    try {
      for (const kind of STATE_KINDS) {
        const data = await this.loadPlain(vm, kind);
        if (data) states[kind] = data;
      }
      const destKey = cryptoPublic(dest.spki);
      blob = sealForMigration({ version: vm.version, vmType: vm.vmType, vmUuid: vm.vmUuid, instance, counter, source: me.fingerprint }, destKey, states);
      await this.store.commitTable();
    } catch (err) {
      vm.status = prev.status;
      vm.migratedTo = prev.migratedTo;
      if (prev.counter === undefined) delete this.record.counters[vm.vmUuid];
      else this.record.counters[vm.vmUuid] = prev.counter;
      throw err;
    }
    const kinds = Object.keys(states).join('+') || 'no state';
    this.log(`migrated out instance ${instance} (vm ${vm.vmUuid}, ${kinds}) to "${name}" ${dest.fingerprint.slice(0, 16)}…, counter ${counter}, ${blob.length}-byte blob`);
    return { status: Status.SUCCESS, params: blob };
  }

  /**
   * MIGRATE_IN (destination): opens a blob made for this manager's key, refuses one it has already taken
   * (or sent: counters only grow per VM) and a VM it already has, then registers the VM (closed, to be
   * OPENed as a resume) and seals its state here, all in one commit.
   */
  async migrateIn(f: Frame): Promise<Reply> {
    const { instance: want, blob } = decodeMigrateIn(f.params);
    const me = await this.identity();
    const describe = (h: { id: Buffer; vmUuid: string; counter: number; source: Buffer }): string =>
      `blob ${h.id.toString('hex').slice(0, 8)} for vm ${h.vmUuid} (counter ${h.counter}, from key ${short(h.source)})`;
    let opened: ReturnType<typeof openMigration>;
    try {
      opened = openMigration(me, blob);
    } catch (err) {
      // The header was readable (only BAD_FORMAT means it was not): name the blob in the refusal.
      if (err instanceof MigrationError && err.code !== 'BAD_FORMAT') throw new MigrationError(err.code, `${describe(readBlobHeader(blob))}: ${err.message}`);
      throw err;
    }
    const { header: h, states } = opened;
    const what = describe(h);
    const seen = this.record.counters[h.vmUuid];
    if (seen !== undefined && h.counter <= seen)
      throw new Refusal(Status.AUTHFAIL, `${what}: this manager already took in or sent out counter ${seen} of that vm (a replayed or stale blob)`);
    const present = this.table.byUuid(h.vmUuid);
    if (present) throw new Refusal(Status.BAD_PARAMETER, `${what}: vm is already here as instance ${present.instance} (${present.status}); DELETE it first`);
    let instance: number;
    try {
      instance = this.table.freeInstance(want);
    } catch (err) {
      throw new Refusal(Status.BAD_PARAMETER, `${what}: ${(err as Error).message}`);
    }
    const t = new Date().toISOString();
    const record: VmRecord = {
      vmUuid: h.vmUuid,
      instance,
      version: h.version,
      created: t,
      lastSeen: t,
      status: 'closed',
      vmType: h.vmType,
      startup: Startup.SAVE,
      migType: MigType.MIGRATABLE,
      migCounter: h.counter,
    };
    this.table.insert(record);
    this.record.counters[h.vmUuid] = h.counter;
    // Enqueued together: the blobs and the table entry naming them land in one commit, or none does.
    const ops: Promise<void>[] = [];
    for (const kind of STATE_KINDS) {
      const data = states[kind];
      if (!data) continue;
      const generation = this.store.reserve();
      ops.push(this.store.save(instance, kind, generation, this.sealer.seal({ instance, vmUuid: h.vmUuid, kind, generation }, data)));
    }
    ops.push(this.store.commitTable());
    const settled = await Promise.allSettled(ops);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      this.table.delete(instance);
      if (seen === undefined) delete this.record.counters[h.vmUuid];
      else this.record.counters[h.vmUuid] = seen;
      throw failed.reason;
    }
    this.log(`migrated in ${what} as instance ${instance} (${Object.keys(states).join('+') || 'no state'})`);
    return { status: Status.SUCCESS, params: encodeInstanceParam(instance) };
  }
}

function short(fp: Uint8Array): string {
  return `${Buffer.from(fp).toString('hex').slice(0, 16)}…`;
}

function cryptoPublic(spkiB64: string): crypto.KeyObject {
  return crypto.createPublicKey({ key: Buffer.from(spkiB64, 'base64'), format: 'der', type: 'spki' });
}

