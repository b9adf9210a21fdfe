// The vTPM manager daemon: answers the console (privileged: OPEN, CLOSE, DELETE, MIGRATE_*) and every
// attached client (SAVENVM, LOADNVM and the other blob ordinals) on the FIFOs of fifo.ts, keeping the
// VM table and sealed state in the group-commit store. Each client's responses go out in the order
// of its requests (the Xen framing has no request id), while its requests run concurrently so that
// saves of many instances share commits. A bad frame costs its sender an error response and a log
// line; nobody else notices.
import fs from 'node:fs';
import path from 'node:path';
import { processAlive } from '../xen/proc.js';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { ClientChannel, FifoServer } from './fifo.js';
import { DEFAULT_SEAL_PCRS, SealError, Sealer, loadKeyFile, loadTpmSealedKey } from './seal.js';
import { DirOps, GroupCommitStore, StoreError } from './store.js';
import { VmTable, VmTableError, legacyUuid, type VmRecord } from './vm-table.js';
import {
  ANY_INSTANCE,
  Ord,
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
  type StatusCode,
} from './wire.js';

export interface ManagerOptions {
  stateDir: string;
  runDir: string;
  /** tpm2-tools TCTI of a host TPM to seal the master key to; absent: a 0600 key file. */
  sealToTpm?: string;
  sealPcrs?: string;
  /** Write-ahead log size and append mode (store.ts StoreOptions). */
  logBytes?: number;
  append?: 'sync' | 'async';
  log?: (line: string) => void;
}

export const PID_FILE = 'manager.pid';

const SAVE_ORDS: Record<number, StateKind> = { [Ord.SAVENVM]: 'permanent', [Ord.SAVE_VOLATILE]: 'volatile', [Ord.SAVE_SAVESTATE]: 'savestate' };
const LOAD_ORDS: Record<number, StateKind> = { [Ord.LOADNVM]: 'permanent', [Ord.LOAD_VOLATILE]: 'volatile', [Ord.LOAD_SAVESTATE]: 'savestate' };

/** A refusal: the status sent back and the log line naming the offender. */
class Refusal extends Error {
  constructor(
    readonly status: StatusCode,
    message: string,
  ) {
    super(message);
  }
}

interface Reply {
  status: StatusCode;
  params?: Uint8Array;
}

export class ManagerDaemon {
  #server!: FifoServer;
  #table!: VmTable;
  #store!: GroupCommitStore;
  #sealer!: Sealer;
  #consoleTail: Promise<void> = Promise.resolve();
  #log: (line: string) => void;

  private constructor(readonly opts: ManagerOptions) {
    this.#log = opts.log ?? ((l) => process.stderr.write(`vtpm-manager: ${l}\n`));
  }

  static async start(opts: ManagerOptions): Promise<ManagerDaemon> {
    const d = new ManagerDaemon(opts);
    await d.#start();
    return d;
  }

  get store(): GroupCommitStore {
    return this.#store;
  }

  async #start(): Promise<void> {
    const { stateDir, runDir } = this.opts;
    fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
    this.#claimPidFile(runDir);
    this.#claimPidFile(stateDir);
    const { key, created } = this.opts.sealToTpm
      ? loadTpmSealedKey(stateDir, { tcti: this.opts.sealToTpm, pcrs: this.opts.sealPcrs ?? DEFAULT_SEAL_PCRS })
      : loadKeyFile(stateDir);
    this.#log(`${created ? 'created' : 'loaded'} master key (${this.opts.sealToTpm ? `sealed to ${this.opts.sealToTpm}` : 'key file'})`);
    this.#sealer = new Sealer(key);
    const { store, table } = await GroupCommitStore.open(new DirOps(stateDir), this.#sealer.metaKey(), () => this.#table.toJSON(), {
      logBytes: this.opts.logBytes,
      append: this.opts.append,
    });
    this.#store = store;
    this.#table = VmTable.fromJSON(table);
    if (store.stats.replayed > 0) this.#log(`replayed ${store.stats.replayed} log records (then: ${store.replayStop})`);
    this.#server = FifoServer.listen(runDir);
    this.#server.on('console', (f) => this.#onConsole(f));
    this.#server.on('consoleError', (e) => this.#onConsoleError(e));
    this.#server.on('rendezvousError', (msg) => this.#log(`rendezvous: ${msg}`));
    this.#server.on('client', (ch) => this.#onClient(ch));
    this.#log(`serving ${this.#table.size} vTPMs from ${stateDir} on ${runDir}`);
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
    // A failed final checkpoint loses nothing: the log still holds every acknowledged save.
    await this.#store.close().catch((err: unknown) => this.#log(`final checkpoint failed (the next start replays the log): ${(err as Error).message}`));
    fs.rmSync(path.join(this.opts.runDir, PID_FILE), { force: true });
    fs.rmSync(path.join(this.opts.stateDir, PID_FILE), { force: true });
    const st = this.#store.stats;
    this.#log(`stopped (${st.saves} saves in ${st.commits} commits, ${st.coalesced} coalesced, ${st.checkpoints} checkpoints)`);
  }

  // ---- console ---------------------------------------------------------------------------

  #onConsole(f: Frame): void {
    // Privileged operations change the table: one at a time, answered in order.
    this.#consoleTail = this.#consoleTail
      .then(async () => {
        const reply = await this.#answer('console', f, () => this.#console(f));
        this.#server.replyConsole(encodeResponse(f.instance, reply.status, reply.params));
      })
      .catch((err: unknown) => this.#log(`console: reply lost: ${(err as Error).message}`));
  }

  #onConsoleError(e: WireError): void {
    this.#log(`console: ${e.message}; answered ${STATUS_NAMES[e.status]}`);
    this.#server.replyConsole(encodeResponse(e.instance ?? 0, e.status));
  }

  async #console(f: Frame): Promise<Reply> {
    if (f.tag !== TAG_REQ) throw new Refusal(Status.UNSUPPORTED, `TPM command (tag 0x${f.tag.toString(16)}): this manager forwards no TPM commands`);
    if (!isPrivileged(f.code)) throw new Refusal(Status.INVALID_REQUEST, `${ordinalName(f.code)} belongs on a client FIFO, not the console`);
    switch (f.code) {
      case Ord.OPEN:
        return this.#open(f);
      case Ord.CLOSE: {
        const inst = decodeInstanceParam(f.params, 'CLOSE');
        this.#table.close(inst);
        await this.#store.commitTable();
        this.#log(`closed instance ${inst}`);
        return { status: Status.SUCCESS };
      }
      case Ord.DELETE: {
        const inst = decodeInstanceParam(f.params, 'DELETE');
        const r = this.#table.delete(inst);
        await this.#store.remove(inst);
        this.#log(`deleted instance ${inst} (vm ${r.vmUuid}) and its state`);
        return { status: Status.SUCCESS };
      }
      case Ord.MIGRATE_IN:
      case Ord.MIGRATE_OUT:
        throw new Refusal(Status.UNSUPPORTED, `${ordinalName(f.code)}: migration is not implemented yet`);
      default:
        throw new Refusal(Status.UNSUPPORTED, `unknown privileged ordinal ${ordinalName(f.code)}`);
    }
  }

  async #open(f: Frame): Promise<Reply> {
    const p = decodeOpen(f.params);
    let vmUuid = p.vmUuid;
    let version = p.version;
    if (vmUuid === null) {
      // A Xen 3.x hotplug OPEN: no uuid, the instance number is the identity.
      if (p.instance === 0) throw new Refusal(Status.INVALID_REQUEST, 'a 7-byte (Xen) OPEN must name an instance');
      const known = this.#table.byInstance(p.instance);
      vmUuid = known?.vmUuid ?? legacyUuid(p.instance);
      version = known?.version ?? '1.2';
    }
    const { record, created } = this.#table.open({ vmUuid, version: version!, instance: p.instance, vmType: p.vmType, startup: p.startup });
    await this.#store.commitTable();
    this.#log(`${created ? 'created' : 'resumed'} instance ${record.instance} for vm ${record.vmUuid} (TPM ${record.version})`);
    return { status: Status.SUCCESS, params: encodeOpenResult(record.instance, created) };
  }

  // ---- clients ---------------------------------------------------------------------------

  #onClient(ch: ClientChannel): void {
    const bound = ch.info.bind === ANY_INSTANCE ? 'any instance' : `instance ${ch.info.bind}`;
    this.#log(`${ch.label} attached (${bound})`);
    let tail: Promise<void> = Promise.resolve();
    ch.on('frame', (f) => {
      const reply = this.#answer(ch.label, f, () => this.#client(ch, f));
      tail = tail
        .then(async () => {
          const r = await reply;
          ch.send(encodeResponse(f.instance, r.status, r.params));
        })
        .catch((err: unknown) => this.#log(`${ch.label}: reply lost: ${(err as Error).message}`));
    });
    ch.on('error', (e) => {
      // One writer on this FIFO: after a framing error there is no telling where the next frame starts.
      this.#log(`${ch.label}: ${e.message}; answered ${STATUS_NAMES[e.status]} and dropped its FIFO pair`);
      tail = tail.then(() => {
        ch.send(encodeResponse(e.instance ?? 0, e.status));
        ch.close('framing error');
      });
    });
    ch.on('gone', (why) => this.#log(`${ch.label} detached: ${why}`));
  }

  async #client(ch: ClientChannel, f: Frame): Promise<Reply> {
    if (f.tag !== TAG_REQ) throw new Refusal(Status.UNSUPPORTED, `TPM command (tag 0x${f.tag.toString(16)}): this manager forwards no TPM commands`);
    if (isPrivileged(f.code)) throw new Refusal(Status.FORBIDDEN, `privileged ordinal ${ordinalName(f.code)} on a client FIFO`);
    if (ch.info.bind !== ANY_INSTANCE && f.instance !== ch.info.bind)
      throw new Refusal(Status.FORBIDDEN, `instance ${f.instance} addressed by a client bound to instance ${ch.info.bind}`);
    switch (f.code) {
      case Ord.TPMCOMMAND:
      case Ord.GET_MIG_KEY:
      case Ord.LOAD_MIG_KEY:
        throw new Refusal(Status.UNSUPPORTED, `${ordinalName(f.code)} is not implemented`);
    }
    const saveKind = SAVE_ORDS[f.code];
    const loadKind = LOAD_ORDS[f.code];
    if (saveKind === undefined && loadKind === undefined && f.code !== Ord.DELETE_STATE)
      throw new Refusal(Status.UNSUPPORTED, `unknown ordinal ${ordinalName(f.code)}`);
    const vm = this.#openVm(f.instance);
    if (saveKind) return this.#save(vm, saveKind, f.params);
    if (loadKind) return this.#load(vm, loadKind);
    if (f.params.length !== 1 || f.params[0]! >= STATE_KINDS.length)
      throw new Refusal(Status.INVALID_REQUEST, `DELETE_STATE takes one kind byte (0..2), got ${f.params.length} bytes`);
    await this.#store.remove(vm.instance, [STATE_KINDS[f.params[0]!]!]);
    return { status: Status.SUCCESS };
  }

  #openVm(instance: number): VmRecord {
    const vm = this.#table.byInstance(instance);
    if (!vm) throw new Refusal(Status.INVALID_REQUEST, `unknown instance ${instance}`);
    if (vm.status !== 'open') throw new Refusal(Status.FORBIDDEN, `instance ${instance} is closed (OPEN it on the console first)`);
    return vm;
  }

  async #save(vm: VmRecord, kind: StateKind, data: Uint8Array): Promise<Reply> {
    // An empty LOAD reply means "never stored", so an empty blob cannot be stored.
    if (data.length === 0) throw new Refusal(Status.INVALID_REQUEST, `empty ${kind} blob for instance ${vm.instance}`);
    const generation = this.#store.reserve();
    const sealed = this.#sealer.seal({ instance: vm.instance, vmUuid: vm.vmUuid, kind, generation }, data);
    this.#table.touch(vm.instance);
    await this.#store.save(vm.instance, kind, generation, sealed);
    return { status: Status.SUCCESS };
  }

  async #load(vm: VmRecord, kind: StateKind): Promise<Reply> {
    const got = await this.#store.load(vm.instance, kind);
    if (!got) return { status: Status.SUCCESS, params: new Uint8Array(0) };
    try {
      const data = this.#sealer.open({ instance: vm.instance, vmUuid: vm.vmUuid, kind, generation: got.generation }, got.data);
      return { status: Status.SUCCESS, params: data };
    } catch (err) {
      if (err instanceof SealError)
        throw new Refusal(Status.RESTORE_CONTEXT_FAILED, `state file ${this.#store.ops.description}/i${vm.instance}.${kind}.g${got.generation}.blob refused: ${err.message}`);
      throw err;
    }
  }

  /** Runs a handler; any refusal or failure becomes a VTPM_* status and one log line. */
  async #answer(who: string, f: Frame, fn: () => Promise<Reply>): Promise<Reply> {
    try {
      return await fn();
    } catch (err) {
      let status: StatusCode = Status.FAIL;
      if (err instanceof Refusal || err instanceof WireError) status = err.status;
      else if (err instanceof VmTableError) status = err.code === 'FULL' ? Status.FAIL : Status.INVALID_REQUEST;
      else if (err instanceof StoreError) status = err.code === 'IO' ? Status.FAIL : Status.RESTORE_CONTEXT_FAILED;
      this.#log(`${who}: ${ordinalName(f.code)} on instance ${f.instance}: ${(err as Error).message}; answered ${STATUS_NAMES[status]}`);
      return { status };
    }
  }
}
