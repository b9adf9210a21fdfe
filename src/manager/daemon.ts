// The vTPM manager daemon: answers the console (privileged: OPEN, CLOSE, DELETE, MIGRATE_*, plus the
// migration-key ordinals) and every attached client (SAVENVM, LOADNVM and the other blob ordinals) on
// the FIFOs of fifo.ts, keeping the VM table, the migration keys and sealed state in the group-commit
// store. Pairs attached through the console FIFO are the console's: privileged ordinals are taken there. Each client's responses go out in the order
// of its requests (the Xen framing has no request id), while its requests run concurrently so that
// saves of many instances share commits. A bad frame costs its sender an error response and a log
// line; nobody else notices.
import fs from 'node:fs';
import path from 'node:path';
import { processAlive } from '../util/proc.js';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { ClientChannel, FifoServer, type QueueLimits } from './fifo.js';
import { DEFAULT_SEAL_PCRS, SealError, Sealer, loadKeyFile, loadTpmSealedKey, readMasterKeyFile } from './seal.js';
import { DirOps } from './store-ops.js';
import { GroupCommitStore } from './store.js';
import { EtcdStore } from './etcd-store.js';
import type { EtcdTls } from './etcd-claims.js';
import type { VtpmStore } from './vm-store.js';
import { MigType, VmTable, legacyUuid, type VmRecord } from './vm-table.js';
import { MigrationHandlers } from './migration-handlers.js';
import { emptyMigrationRecord, migrationRecordFrom, type MigrationRecord } from './migration.js';
import { Refusal, type Reply } from './refusal.js';
import { statusForError } from './refusal-status.js';
import { HeldVolatile } from './held-volatile.js';
import { heldWriter } from './held-writer.js';
import { claimForOpen, deleteInCluster, refreshTable } from './cluster-ops.js';
import {
  ANY_INSTANCE,
  LOAD_ORD,
  Ord,
  SAVE_ORD,
  STATUS_NAMES,
  Status,
  TAG_REQ,
  WireError,
  decodeInstanceParam,
  decodeOpen,
  encodeOpenResult,
  encodeResponse,
  isPrivileged,
  ordinalName,
  type Frame,
} from './wire.js';
import { escapeLogLine } from '../util/log-escape.js';
import { CA_CHAIN_FILE, EkCa } from './ca.js';
import type { PlatformIdentity } from './ca-files.js';
import { Factory, type EkChoice } from './manufacture.js';
import type { StateStore } from '../tpm/state-store.js';
import { managerMetrics } from '../util/metrics.js';
import { LogRateLimiter } from '../util/rate-limit.js';

export interface ManagerOptions {
  stateDir: string;
  runDir: string;
  /** tpm2-tools TCTI of a host TPM to seal the master key to; absent: a 0600 key file. */
  sealToTpm?: string;
  sealPcrs?: string;
  /** Write-ahead log size and append mode (store.ts StoreOptions). */
  logBytes?: number;
  append?: 'sync' | 'async';
  /**
   * State in an etcd cluster instead of stateDir (docs/cluster.md): every host of it shares the
   * master key file; stateDir then holds only the pid file.
   */
  etcd?: { url: string; masterKey: string; leaseTtl: number; host: string; tls?: EtcdTls };
  /** Bounds on replies a client leaves unread before it is cut off (fifo.ts QueueLimits). */
  clientQueue?: Partial<QueueLimits>;
  /** HOLD_VOLATILE checkpoints are written to the store this long after the first is held (default HOLD_FLUSH_MS). */
  holdFlushMs?: number;
  /** An operator's EK CA directory (cert.pem, key.pem); absent: the host CA made in <state>/ca. */
  ca?: string;
  /** EK certificates of a new TPM whose OPEN does not choose (default both); `platform`: what its platform certificate names. */
  ekCerts?: EkChoice;
  platform?: PlatformIdentity;
  log?: (line: string) => void;
}

export const PID_FILE = 'manager.pid';
/** How long a held volatile checkpoint waits before it is written (more holds of it coalesce meanwhile). */
export const HOLD_FLUSH_MS = 1000;

const byOrdinal = (t: Record<StateKind, number>): Record<number, StateKind> => Object.fromEntries(Object.entries(t).map(([k, o]) => [o, k as StateKind]));
const SAVE_ORDS = byOrdinal(SAVE_ORD);
const LOAD_ORDS = byOrdinal(LOAD_ORD);

/** What the store's table record holds: the VM table and the migration record (a bare list before migration existed). */
function splitTable(x: unknown): { vms: unknown; migration: MigrationRecord } {
  if (x && typeof x === 'object' && !Array.isArray(x) && 'vms' in x) {
    const t = x as { vms: unknown; migration?: unknown };
    return { vms: t.vms, migration: migrationRecordFrom(t.migration) };
  }
  return { vms: x, migration: emptyMigrationRecord() };
}

/** Ordinals a console (or a console-attached pair) may send although Xen numbers them unprivileged. */
const CONSOLE_UNPRIVILEGED: readonly number[] = [Ord.GET_MIG_KEY, Ord.LOAD_MIG_KEY];

export class ManagerDaemon {
  #server!: FifoServer;
  #table!: VmTable;
  #store!: VtpmStore;
  /** The cluster store when the state is in etcd: claims on OPEN, release on CLOSE. */
  #cluster: EtcdStore | null = null;
  #sealer!: Sealer;
  #migration: MigrationRecord = emptyMigrationRecord();
  #mig!: MigrationHandlers;
  #consoleTail: Promise<void> = Promise.resolve();
  #held!: HeldVolatile;
  #consoleDrops = 0;
  #factory!: Factory;
  #log: (line: string) => void;
  readonly #refusals = new LogRateLimiter((l) => this.#log(l));

  private constructor(readonly opts: ManagerOptions) {
    this.#log = opts.log ?? ((l) => process.stderr.write(`vtpm-manager: ${escapeLogLine(l)}\n`));
  }

  static async start(opts: ManagerOptions): Promise<ManagerDaemon> {
    const d = new ManagerDaemon(opts);
    await d.#start();
    return d;
  }

  get store(): VtpmStore {
    return this.#store;
  }

  async #start(): Promise<void> {
    const { stateDir, runDir } = this.opts;
    fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
    this.#claimPidFile(runDir);
    this.#claimPidFile(stateDir);
    const etcd = this.opts.etcd;
    const { key, created } = etcd
      ? { key: readMasterKeyFile(etcd.masterKey), created: false }
      : this.opts.sealToTpm
        ? loadTpmSealedKey(stateDir, { tcti: this.opts.sealToTpm, pcrs: this.opts.sealPcrs ?? DEFAULT_SEAL_PCRS })
        : loadKeyFile(stateDir);
    this.#log(`${created ? 'created' : 'loaded'} master key (${etcd ? etcd.masterKey : this.opts.sealToTpm ? `sealed to ${this.opts.sealToTpm}` : 'key file'})`);
    this.#sealer = new Sealer(key);
    const snapshot = () => ({ vms: this.#table.toJSON(), migration: this.#migration });
    let store: VtpmStore;
    let table: unknown;
    if (etcd) {
      const o = await EtcdStore.open({
        url: etcd.url,
        tls: etcd.tls,
        host: etcd.host,
        ttlSeconds: etcd.leaseTtl,
        metaKey: this.#sealer.metaKey(),
        vm: (instance) => this.#table.byInstance(instance),
        snapshot,
        log: (l) => this.#log(l),
      });
      this.#cluster = o.store;
      store = o.store;
      table = o.table;
    } else {
      ({ store, table } = await GroupCommitStore.open(new DirOps(stateDir), this.#sealer.metaKey(), snapshot, {
        logBytes: this.opts.logBytes,
        append: this.opts.append,
      }));
    }
    this.#store = store;
    const { ca, created: caCreated } = await EkCa.open({ stateDir, operatorDir: this.opts.ca, wrapKey: this.opts.sealToTpm ? this.#sealer.caKeyWrap() : undefined });
    this.#log(`${caCreated ? 'created' : 'loaded'} EK CA (${ca.source}, issuer ${ca.signer.cert.subject})`);
    fs.writeFileSync(path.join(runDir, CA_CHAIN_FILE), ca.chainPem, { mode: 0o644 });
    const { vms, migration } = splitTable(table);
    this.#table = VmTable.fromJSON(vms);
    this.#migration = migration;
    this.#mig = new MigrationHandlers({
      table: this.#table,
      store,
      sealer: this.#sealer,
      record: migration,
      log: (l) => this.#log(l),
      loadPlain: (vm, kind) => this.#loadPlain(vm, kind),
    });
    if (store instanceof GroupCommitStore && store.stats.replayed > 0) this.#log(`replayed ${store.stats.replayed} log records (then: ${store.replayStop})`);
    const writer = heldWriter((i) => this.#table.byInstance(i), store, this.#sealer);
    this.#held = new HeldVolatile(writer, this.opts.holdFlushMs ?? HOLD_FLUSH_MS, (l) => this.#log(l));
    // Last before serving: its libtpms work must not keep a manager that failed to start alive.
    this.#factory = new Factory(ca, (l) => this.#log(l), this.opts.platform);
    this.#server = FifoServer.listen(runDir, this.opts.clientQueue);
    this.#server.on('console', (f) => this.#onConsole(f));
    this.#server.on('consoleError', (e) => this.#onConsoleError(e));
    this.#server.on('rendezvousError', (msg) => this.#log(`rendezvous: ${msg}`));
    this.#server.on('client', (ch) => this.#onClient(ch));
    this.#log(`serving ${this.#table.size} vTPMs from ${etcd ? `${etcd.url} as host "${etcd.host}"` : stateDir} on ${runDir}`);
  }

  /** One manager per run directory and per state directory: two would interleave commits. */
  #claimPidFile(dir: string): void {
    const p = path.join(dir, PID_FILE);
    try {
      const other = Number(fs.readFileSync(p, 'utf8'));
      if (Number.isInteger(other) && other > 0 && other !== process.pid) {
        // A manager killed with -9 may still be a zombie for a moment: that one is dead.
        if (processAlive(other)) throw new Error(`another manager (pid ${other}) serves ${dir}`);
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    fs.writeFileSync(p, `${process.pid}\n`);
  }

  async stop(): Promise<void> {
    this.#server.close();
    await this.#consoleTail;
    this.#held.stop();
    await this.#held.flush().catch((err: unknown) => this.#log(`writing held volatile state at shutdown: ${(err as Error).message}`));
    await this.#factory.close();
    // A failed final checkpoint loses nothing: the log still holds every acknowledged save.
    await this.#store.close().catch((err: unknown) => this.#log(`final checkpoint failed (the next start replays the log): ${(err as Error).message}`));
    fs.rmSync(path.join(this.opts.runDir, PID_FILE), { force: true });
    fs.rmSync(path.join(this.opts.stateDir, PID_FILE), { force: true });
    const st = this.#store.stats;
    this.#refusals.flush();
    this.#log(`stopped (${st.saves} saves in ${st.commits} commits, ${st.coalesced} coalesced, ${st.checkpoints} checkpoints)`);
  }

  // ---- console ---------------------------------------------------------------------------

  /** Privileged operations change the table: one at a time, whichever console pair they came on. */
  #serialized<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.#consoleTail.then(fn);
    this.#consoleTail = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  #onConsole(f: Frame): void {
    void this.#serialized(async () => {
      const reply = await this.#answer('console', f, () => this.#console(f));
      // One log line per episode of unread replies, not one per dropped reply.
      if (!this.#server.replyConsole(encodeResponse(f.instance, reply.status, reply.params, f.tag))) {
        if (this.#consoleDrops++ === 0) this.#log(`console: ${ordinalName(f.code)} reply dropped: to_console.fifo is full of replies nobody read`);
      } else if (this.#consoleDrops > 0) {
        this.#log(`console: replies flow again after ${this.#consoleDrops} were dropped`);
        this.#consoleDrops = 0;
      }
    }).catch((err: unknown) => this.#log(`console: reply lost: ${(err as Error).message}`));
  }

  /**
   * No reply to a frame that could not be read: the console FIFO has many writers and every reader takes
   * the next reply, so a reply to garbage would be read by the next script as its own (Xen's manager
   * also dropped a short frame without a reply).
   */
  #onConsoleError(e: WireError): void {
    this.#log(`console: ${e.message}; frame dropped, no reply`);
  }

  async #console(f: Frame): Promise<Reply> {
    if (f.tag !== TAG_REQ) throw new Refusal(Status.FAIL, `TPM command (tag 0x${f.tag.toString(16)}): this manager forwards no TPM commands`);
    if (!isPrivileged(f.code) && !CONSOLE_UNPRIVILEGED.includes(f.code))
      throw new Refusal(Status.BAD_ORDINAL, `${ordinalName(f.code)} belongs on a client FIFO, not the console`);
    return this.#privileged(f);
  }

  async #privileged(f: Frame): Promise<Reply> {
    switch (f.code) {
      case Ord.OPEN:
        return this.#open(f);
      case Ord.CLOSE: {
        const inst = decodeInstanceParam(f.params, 'CLOSE');
        if (this.#table.byInstance(inst)?.status === 'closed') throw new Refusal(Status.BAD_PARAMETER, `CLOSE of instance ${inst}, which is not open`);
        // Durable at close: a held checkpoint is written before the instance stops taking saves.
        await this.#held.flush(inst);
        this.#held.drop(inst);
        const closed = this.#table.close(inst);
        await this.#store.commitTable();
        // Another host may take the VM from now on.
        await this.#cluster?.claims.release(closed.vmUuid);
        this.#log(`closed instance ${inst}`);
        return { status: Status.SUCCESS };
      }
      case Ord.DELETE: {
        const inst = decodeInstanceParam(f.params, 'DELETE');
        if (this.#cluster) return deleteInCluster(this.#cluster, this.#table, inst, (l) => this.#log(l));
        const r = this.#table.delete(inst);
        this.#held.drop(inst);
        await this.#store.remove(inst);
        this.#log(`deleted instance ${inst} (vm ${r.vmUuid}) and its state`);
        return { status: Status.SUCCESS };
      }
      case Ord.MIGRATE_IN:
      case Ord.MIGRATE_OUT:
        if (this.#cluster)
          throw new Refusal(
            Status.BAD_ORDINAL,
            `${ordinalName(f.code)} moves a vTPM between stores that share nothing; on ${this.#cluster.description} a VM moves by CLOSE on one host and OPEN on another`,
          );
        return f.code === Ord.MIGRATE_IN ? this.#mig.migrateIn(f) : this.#mig.migrateOut(f);
      case Ord.GET_MIG_KEY:
        return this.#mig.getMigKey(f);
      case Ord.LOAD_MIG_KEY:
        return this.#mig.loadMigKey(f);
      default:
        throw new Refusal(Status.BAD_ORDINAL, `unknown privileged ordinal ${ordinalName(f.code)}`);
    }
  }

  async #open(f: Frame): Promise<Reply> {
    const p = decodeOpen(f.params);
    let vmUuid = p.vmUuid;
    let version = p.version;
    if (p.migType !== MigType.NON_MIGRATABLE && p.migType !== MigType.MIGRATABLE)
      throw new Refusal(Status.BAD_PARAMETER, `OPEN with mig type ${p.migType} (0 non-migratable or 1 migratable)`);
    const xenForm = vmUuid === null;
    if (vmUuid === null) {
      // A Xen 3.x hotplug OPEN: no uuid, the instance number is the identity; instance 0 is Xen's dom0 DMI.
      if (p.instance === 0) throw new Refusal(Status.BAD_PARAMETER, 'a 7-byte (Xen) OPEN must name an instance');
      if (this.#cluster) await refreshTable(this.#cluster, this.#table);
      const known = this.#table.byInstance(p.instance);
      // Xen refused to re-attach a connected DMI; our 24-byte OPEN resumes it (a restarted backend re-opens).
      if (known?.status === 'open') throw new Refusal(Status.BAD_PARAMETER, `instance ${p.instance} is already open (CLOSE it first)`);
      vmUuid = known?.vmUuid ?? legacyUuid(p.instance);
      version = known?.version ?? '1.2';
    }
    const instance = this.#cluster ? await claimForOpen(this.#cluster, this.#table, vmUuid, p.instance, { refreshed: xenForm }) : p.instance;
    const { record, created } = this.#table.open({ vmUuid, version: version!, instance, vmType: p.vmType, startup: p.startup, migType: p.migType });
    await this.#manufacture(record, created, p.ek ?? this.opts.ekCerts ?? 'both');
    await this.#store.commitTable();
    this.#log(`${created ? 'created' : 'resumed'} instance ${record.instance} for vm ${record.vmUuid} (TPM ${record.version})`);
    // A Xen-form request gets Xen's reply: the status alone (a hotplug script reads exactly 14 bytes).
    return xenForm ? { status: Status.SUCCESS } : { status: Status.SUCCESS, params: encodeOpenResult(record.instance, created) };
  }

  /** A new TPM is made before OPEN is answered (manufacture.ts); if that fails, a new VM goes again. */
  async #manufacture(vm: VmRecord, created: boolean, choice: EkChoice): Promise<void> {
    const store: StateStore = {
      load: (_i, kind) => this.#loadPlain(vm, kind),
      store: async (_i, kind, blob) => void (await this.#save(vm, kind, blob)),
      delete: (_i, kind) => this.#store.remove(vm.instance, [kind]),
    };
    try {
      await this.#factory.atOpen(vm, created, choice, store);
    } catch (err) {
      if (created) this.#table.delete(vm.instance);
      throw err;
    }
  }

  // ---- clients ---------------------------------------------------------------------------

  #onClient(ch: ClientChannel): void {
    const bound = ch.info.bind === ANY_INSTANCE ? 'any instance' : `instance ${ch.info.bind}`;
    this.#log(`${ch.label} attached (${bound}${ch.info.privileged ? ', privileged: through the console' : ''})`);
    let tail: Promise<void> = Promise.resolve();
    let behind = 0; // replies queued in `tail`: one made at once goes out only when there are none
    ch.on('frame', (f) => {
      let made: Reply | Promise<Reply>;
      try {
        made = this.#client(ch, f);
      } catch (err) {
        made = this.#refused(ch.label, f, err);
      }
      // Made at once (a hold or append in memory, a refusal) and none queued ahead: no promise chain.
      if (!(made instanceof Promise) && behind === 0) {
        ch.send(encodeResponse(f.instance, made.status, made.params, f.tag));
        return;
      }
      behind++;
      const reply = Promise.resolve(made).catch((err: unknown) => this.#refused(ch.label, f, err));
      tail = tail
        .then(async () => {
          const r = await reply;
          ch.send(encodeResponse(f.instance, r.status, r.params, f.tag));
        })
        .catch((err: unknown) => this.#log(`${ch.label}: reply lost: ${(err as Error).message}`))
        .finally(() => behind--);
    });
    ch.on('error', (e) => {
      // One writer on this FIFO: after a framing error there is no telling where the next frame starts.
      this.#refusals.end(ch.label);
      this.#log(`${ch.label}: ${e.message}; answered ${STATUS_NAMES[e.status]} and dropped its FIFO pair`);
      tail = tail.then(() => {
        ch.send(encodeResponse(e.instance ?? 0, e.status));
        ch.close('framing error');
      });
    });
    ch.on('gone', (why) => {
      this.#refusals.end(ch.label);
      this.#log(`${ch.label} detached: ${why}`);
    });
  }

  /** A client's request: answered synchronously where it touches only memory, else by a promise; throws a refusal. */
  #client(ch: ClientChannel, f: Frame): Reply | Promise<Reply> {
    if (f.tag !== TAG_REQ) throw new Refusal(Status.FAIL, `TPM command (tag 0x${f.tag.toString(16)}): this manager forwards no TPM commands`);
    if (ch.info.privileged && (isPrivileged(f.code) || CONSOLE_UNPRIVILEGED.includes(f.code))) return this.#serialized(() => this.#privileged(f));
    if (isPrivileged(f.code)) throw new Refusal(Status.BAD_ORDINAL, `privileged ordinal ${ordinalName(f.code)} on a client FIFO`);
    if (ch.info.bind !== ANY_INSTANCE && f.instance !== ch.info.bind)
      throw new Refusal(Status.AUTHFAIL, `instance ${f.instance} addressed by a client bound to instance ${ch.info.bind}`);
    switch (f.code) {
      case Ord.TPMCOMMAND:
        // Xen's manager passed a DMI's TPM command through to the host's hardware TPM (tpmpassthrough.c,
        // minus owner/maintenance ordinals). There is no hardware TPM behind this manager to pass it to.
        throw new Refusal(
          Status.FAIL,
          'TPMCOMMAND passes a vTPM\'s command through to the host\'s hardware TPM (Xen 3.x tpmpassthrough); this manager has no hardware TPM to pass it to, and guest commands never reach the TPM its master key may be sealed to',
        );
      case Ord.GET_MIG_KEY:
        return this.#mig.getMigKey(f);
      case Ord.LOAD_MIG_KEY:
        // Xen took it from any DMI: a vTPM could then re-point a destination name at its own key.
        throw new Refusal(Status.BAD_ORDINAL, 'LOAD_MIG_KEY decides where MIGRATE_OUT may send a vTPM: console or console-attached pairs only');
    }
    const saveKind = SAVE_ORDS[f.code];
    const loadKind = LOAD_ORDS[f.code];
    const holds = HeldVolatile.takes(f.code);
    if (saveKind === undefined && loadKind === undefined && f.code !== Ord.DELETE_STATE && !holds)
      throw new Refusal(Status.BAD_ORDINAL, `unknown ordinal ${ordinalName(f.code)}`);
    const vm = this.#openVm(f.instance);
    if (holds) return (this.#held.take(f.code, vm.instance, f.params), { status: Status.SUCCESS });
    if (saveKind) return this.#save(vm, saveKind, f.params);
    if (loadKind) return this.#load(vm, loadKind);
    if (f.params.length !== 1 || f.params[0]! >= STATE_KINDS.length)
      throw new Refusal(Status.BAD_PARAMETER, `DELETE_STATE takes one kind byte (0..2), got ${f.params.length} bytes`);
    const kind = STATE_KINDS[f.params[0]!]!;
    if (kind === 'volatile') this.#held.drop(vm.instance);
    return this.#store.remove(vm.instance, [kind]).then(() => ({ status: Status.SUCCESS }));
  }

  #openVm(instance: number): VmRecord {
    const vm = this.#table.byInstance(instance);
    // Xen answered a non-existent or disconnected DMI (and a migrated one) with TPM_BAD_PARAMETER.
    if (!vm) throw new Refusal(Status.BAD_PARAMETER, `unknown instance ${instance}`);
    if (vm.status === 'migrated')
      throw new Refusal(
        Status.BAD_PARAMETER,
        `instance ${instance} (vm ${vm.vmUuid}) was migrated out to "${vm.migratedTo?.name}" (counter ${vm.migratedTo?.counter}); its state stays frozen here until DELETE`,
      );
    if (vm.status !== 'open') throw new Refusal(Status.BAD_PARAMETER, `instance ${instance} is closed (OPEN it on the console first)`);
    return vm;
  }

  async #save(vm: VmRecord, kind: StateKind, data: Uint8Array): Promise<Reply> {
    // An empty LOAD reply means "never stored", so an empty blob cannot be stored.
    if (data.length === 0) throw new Refusal(Status.BAD_PARAMETER, `empty ${kind} blob for instance ${vm.instance}`);
    // A durable volatile save is newer than anything held for the instance.
    if (kind === 'volatile') this.#held.drop(vm.instance);
    const [generation, sealed] = this.#sealed(vm, kind, data);
    this.#table.touch(vm.instance);
    await this.#store.save(vm.instance, kind, generation, sealed);
    return { status: Status.SUCCESS };
  }

  #sealed(vm: VmRecord, kind: StateKind, data: Uint8Array): [number, Uint8Array] {
    const generation = this.#store.reserve();
    return [generation, this.#sealer.seal({ instance: vm.instance, vmUuid: vm.vmUuid, kind, generation }, data)];
  }

  async #load(vm: VmRecord, kind: StateKind): Promise<Reply> {
    const data = await this.#loadPlain(vm, kind);
    // Xen's LOADNVM of a DMI that never saved failed to open its file: TPM_IOERROR. Our clients read it as "never stored".
    if (data === null) return { status: Status.IOERROR };
    return { status: Status.SUCCESS, params: data };
  }

  async #loadPlain(vm: VmRecord, kind: StateKind): Promise<Buffer | null> {
    // A held checkpoint is newer than the stored one (a restarted backend reloads it from here).
    const held = kind === 'volatile' ? this.#held.get(vm.instance) : undefined;
    if (held) return held;
    const got = await this.#store.load(vm.instance, kind);
    if (!got) return null;
    try {
      return this.#sealer.open({ instance: vm.instance, vmUuid: vm.vmUuid, kind, generation: got.generation }, got.data);
    } catch (err) {
      if (err instanceof SealError)
        throw new Refusal(Status.DECRYPT_ERROR, `state file ${this.#store.description}/i${vm.instance}.${kind}.g${got.generation}.blob refused: ${err.message}`);
      throw err;
    }
  }

  /** Runs an async handler; any refusal or failure becomes a tcg.h status and one log line (#refused). */
  #answer(who: string, f: Frame, fn: () => Promise<Reply>): Promise<Reply> {
    return fn().catch((err: unknown) => this.#refused(who, f, err));
  }

  #refused(who: string, f: Frame, err: unknown): Reply {
    const status = statusForError(err);
    managerMetrics().refused.inc({ status: STATUS_NAMES[status] ?? 'unknown' });
    const line = `${who}: ${ordinalName(f.code)} on instance ${f.instance}: ${(err as Error).message}; answered ${STATUS_NAMES[status]}`;
    // The console is dom0's own tool (its refusals explain a CLI error); a client gets a few lines per interval.
    if (who === 'console') this.#log(line);
    else this.#refusals.line(who, line);
    return { status };
  }
}
