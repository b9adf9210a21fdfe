// ManagerClient: what the backend (single-VM mode) or a vTPM-domain process (multi-VM mode) uses to
// talk to the manager. It attaches its own FIFO pair through the rendezvous, pipelines requests on it
// (responses come back in request order), and takes the console pair for the privileged OPEN / CLOSE /
// DELETE. It implements StateStore, so a vTPM engine can use it directly as its store.
import crypto from 'node:crypto';
import fs from 'node:fs';
import type net from 'node:net';
import type { StateKind, StateStore, VolatileHolder } from '../tpm/state-store.js';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FrameReader } from './fifo.js';
import { connectPair, consoleRequest, withConsoleLock, type ClientPair } from './fifo-client.js';
import { decodeMigKey, encodeLoadMigKey, encodeMigrateIn, encodeMigrateOut, type RsaPublic } from './migration.js';
import { MigType } from './vm-table.js';
import {
  ANY_INSTANCE,
  PIPE_BUF,
  SRV_HEADER_SIZE,
  decodeInstanceParam,
  KIND_CODES,
  LOAD_ORD,
  Ord,
  SAVE_ORD,
  STATUS_NAMES,
  Startup,
  Status,
  decodeOpenResult,
  encodeInstanceParam,
  encodeOpen,
  type EkCode,
  encodeRequest,
  ordinalName,
  type Frame,
  type TpmVersion,
} from './wire.js';

export class ManagerError extends Error {
  constructor(
    readonly code: 'STATUS' | 'DISCONNECTED' | 'PROTOCOL',
    message: string,
    /** The tcg.h status the manager answered (code STATUS). */
    readonly status?: number,
  ) {
    super(message);
    this.name = 'ManagerError';
  }
}


export interface ConnectOptions {
  /** Names the FIFO pair (clients/NAME.req.fifo …); default: pid and random bytes. */
  name?: string;
  /** Restricts this client to one instance (a multi-VM vTPM domain); default: any (single-VM backend). */
  bind?: number;
  timeoutMs?: number;
  /** Attach a new FIFO pair on the next request after the manager went away (default true). */
  reconnect?: boolean;
  /**
   * Attach through the console FIFO: the pair then carries privileged ordinals too (OPEN … MIGRATE_IN),
   * of any size, which the shared console FIFO cannot (PIPE_BUF). Needs write access to the console.
   */
  privileged?: boolean;
}

export interface OpenOptions {
  vmUuid: string;
  version: TpmVersion;
  /** Ask for a specific instance number; default: the table's (known VM) or the next free one. */
  instance?: number;
  /** Xen's startup mode (1 clear, 2 save, 3 deactivated); recorded in the table. */
  startup?: number;
  /** Xen's VTPM_TYPE_PVM 1 / HVM 2. */
  vmType?: number;
  /** Xen's mig_type: false opens it NON_MIGRATABLE (MIGRATE_OUT refused); default migratable, as Xen's hotplug scripts open. */
  migratable?: boolean;
  /** EK certificates a new VM's TPM is manufactured with (default: the manager's); ignored for a known VM. */
  ek?: EkCode;
}

interface Pending {
  instance: number;
  ordinal: number;
  resolve: (f: Frame) => void;
  reject: (e: Error) => void;
}

/** How long a client keeps trying to re-attach to a restarted manager to hold its checkpoints again. */
const REHOLD_MS = 60_000;

export class ManagerClient implements StateStore, VolatileHolder {
  #pending: Pending[] = [];
  #gone: Error | null = null;
  #closedByUs = false;
  #reader!: FrameReader;
  #writer!: net.Socket;
  #files: string[] = [];
  #reconnecting: Promise<void> | null = null;
  #generation = 0;
  /** The latest checkpoint held (not yet known durable) per instance, in pieces: held again after a manager restart. */
  readonly #held = new Map<number, Uint8Array[]>();

  private constructor(
    readonly runDir: string,
    private readonly opts: ConnectOptions,
  ) {}

  static async connect(runDir: string, opts: ConnectOptions = {}): Promise<ManagerClient> {
    const c = new ManagerClient(runDir, opts);
    await c.#attach();
    return c;
  }

  /** A pair the backend attached and handed over (a vTPM domain under its own uid): never reattached. */
  static adopt(pair: ClientPair, opts: ConnectOptions = {}): ManagerClient {
    const c = new ManagerClient('', { ...opts, reconnect: false });
    c.#use(pair);
    return c;
  }

  /** The name of the current FIFO pair (a new one after each reconnect). */
  get name(): string {
    return this.#name;
  }
  #name = '';

  async #attach(): Promise<void> {
    const base = this.opts.name ?? `c${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
    const name = this.#generation++ === 0 ? base : `${base}-r${this.#generation}`;
    const pair = await connectPair(this.runDir, {
      name,
      bind: this.opts.bind ?? ANY_INSTANCE,
      timeoutMs: this.opts.timeoutMs,
      via: this.opts.privileged ? 'console' : 'rendezvous',
    });
    this.#use(pair);
  }

  #use(pair: ClientPair): void {
    const { reader, writer, name } = pair;
    this.#name = name;
    this.#reader = reader;
    this.#writer = writer;
    this.#files = pair.files;
    this.#gone = null;
    // Events of a previous pair arriving late must not tear down this one.
    const current = (): boolean => this.#reader === reader;
    reader.on('frame', (f) => current() && this.#onFrame(f));
    reader.on('error', (e) => current() && this.#fail(new ManagerError('PROTOCOL', `bad response from the manager: ${e.message}`)));
    reader.on('end', () => current() && this.#fail(new ManagerError('DISCONNECTED', 'the manager closed our response FIFO')));
    writer.on('error', (e) => current() && this.#fail(new ManagerError('DISCONNECTED', `request FIFO: ${e.message}`)));
  }

  /**
   * One request on our pair; resolves with the response frame whatever its status. Requests in flight
   * when the manager goes away fail with DISCONNECTED (whether they took effect is unknown: a save can
   * simply be repeated); the next request attaches a new pair, unless `reconnect: false`.
   */
  request(instance: number, ordinal: number, params?: Uint8Array): Promise<Frame> {
    // Attached and nothing being held again (every checkpoint of a busy backend): no async frame.
    if (!this.#gone && !this.#reconnecting) return this.#send(instance, ordinal, params);
    return this.#requestAfterReattach(instance, ordinal, params);
  }

  async #requestAfterReattach(instance: number, ordinal: number, params?: Uint8Array): Promise<Frame> {
    // A re-attach that holds our checkpoints again goes first: nothing may read state before it.
    while (this.#gone || this.#reconnecting) {
      if (this.#gone && (this.#closedByUs || this.opts.reconnect === false)) throw this.#gone;
      this.#reconnecting ??= this.#reattach(false);
      await this.#reconnecting;
    }
    return this.#send(instance, ordinal, params);
  }

  #send(instance: number, ordinal: number, params?: Uint8Array): Promise<Frame> {
    if (this.#gone) return Promise.reject(this.#gone);
    return new Promise((resolve, reject) => {
      this.#pending.push({ instance, ordinal, resolve, reject });
      // The requests of one turn of the event loop (every guest's checkpoint whose event came in that
      // turn) leave in one write(2): each ring delivery is its own I/O callback, so a nextTick uncork
      // would write once per guest.
      const w = this.#writer;
      if (!w.writableCorked) {
        w.cork();
        setImmediate(() => w.uncork());
      }
      w.write(encodeRequest(instance, ordinal, params));
    });
  }

  #onFrame(f: Frame): void {
    const p = this.#pending.shift();
    if (!p) return this.#fail(new ManagerError('PROTOCOL', `unsolicited response (status ${f.code}) from the manager`));
    if (f.instance !== p.instance) return this.#fail(new ManagerError('PROTOCOL', `response for instance ${f.instance} to a request for ${p.instance}`));
    p.resolve(f);
  }

  #fail(e: Error): void {
    if (this.#gone) return;
    this.#gone = e;
    for (const p of this.#pending.splice(0)) p.reject(e);
    this.#reader.close();
    this.#writer.destroy();
    // The manager removes them when it sees us go; if it died first, nobody else will.
    for (const f of this.#files) fs.rmSync(f, { force: true });
    // The manager's memory held checkpoints of ours that may not be durable: hold them again at once,
    // so a crash of this process after the manager's restart loses nothing either.
    if (this.#held.size > 0 && this.canHold && !this.#closedByUs) this.#reconnecting ??= this.#reattach(true);
  }

  /**
   * Attach a new pair and hold every checkpoint of #held on it before any other request goes out.
   * `persist`: keep trying (the manager is being restarted) for up to REHOLD_MS.
   */
  #reattach(persist: boolean): Promise<void> {
    const deadline = Date.now() + REHOLD_MS;
    const once = async (): Promise<void> => {
      await this.#attach();
      for (const [instance, pieces] of [...this.#held]) {
        const f = await this.#send(instance, Ord.HOLD_VOLATILE, Buffer.concat(pieces));
        if (f.code !== Status.SUCCESS) throw statusError(Ord.HOLD_VOLATILE, instance, f.code);
      }
    };
    const run = async (): Promise<void> => {
      for (let attempt = 0; ; attempt++) {
        try {
          return await once();
        } catch (err) {
          if (!persist || this.#closedByUs || Date.now() > deadline) throw err;
          this.#gone ??= err as Error;
          // Short steps: until this is done the backend answers nothing, and a restarted manager is up soon.
          await sleep(Math.min(50, 5 * 2 ** Math.min(attempt, 4)));
        }
      }
    };
    const p = run().finally(() => {
      if (this.#reconnecting === p) this.#reconnecting = null;
    });
    // A background re-hold that gives up leaves the next request to try (and report) again.
    if (persist) p.catch(() => undefined);
    return p;
  }

  #call(instance: number, ordinal: number, params?: Uint8Array): Promise<Uint8Array> {
    return this.request(instance, ordinal, params).then((f) => {
      if (f.code !== Status.SUCCESS) throw statusError(ordinal, instance, f.code);
      return f.params;
    });
  }

  // ---- StateStore ------------------------------------------------------------------------

  async load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    const f = await this.request(instance, LOAD_ORD[kind]);
    // TPM_IOERROR is how Xen's manager said "nothing stored"; an empty success is how older managers of ours said it.
    if (f.code === Status.IOERROR) return null;
    if (f.code !== Status.SUCCESS) throw statusError(LOAD_ORD[kind], instance, f.code);
    return f.params.length === 0 ? null : f.params;
  }

  /**
   * A volatile checkpoint just loaded may be held only in the manager's memory: from now on this
   * process holds it too, and holds it again if the manager restarts before it is written.
   */
  adoptHeld(instance: number, blob: Uint8Array): void {
    if (this.canHold) this.#held.set(instance, [blob]);
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    await this.#call(instance, SAVE_ORD[kind], blob);
    // Durable and newer than anything held for it.
    if (kind === 'volatile') this.#held.delete(instance);
  }

  /** HOLD_VOLATILE: acknowledged once the manager holds the checkpoint in memory (docs/manager.md). */
  async holdVolatile(instance: number, blob: Uint8Array): Promise<void> {
    await this.#call(instance, Ord.HOLD_VOLATILE, blob);
    this.#held.set(instance, [blob]);
  }

  /** APPEND_VOLATILE: `bytes` join the checkpoint the manager holds for the instance. */
  appendVolatile(instance: number, bytes: Uint8Array): Promise<void> {
    const pieces = this.#held.get(instance);
    // Nothing held here means nothing we could hold again after a restart: refuse rather than lose it.
    if (!pieces) return Promise.reject(new ManagerError('PROTOCOL', `APPEND_VOLATILE on instance ${instance} without a held checkpoint`));
    return this.#call(instance, Ord.APPEND_VOLATILE, bytes).then(() => {
      pieces.push(bytes);
    });
  }

  settled(): Promise<void> | null {
    // Asked after every group of ring commands: no promise when nothing is being held again.
    if (!this.#reconnecting) return null;
    return (async () => {
      while (this.#reconnecting) await this.#reconnecting.catch(() => undefined);
    })();
  }

  /** A pair handed over (reconnect: false) cannot hold checkpoints again after a manager restart. */
  get canHold(): boolean {
    return this.opts.reconnect !== false;
  }

  /**
   * With a kind: removes that blob (StateStore.delete). Without: DELETE on the console, which drops
   * the VM's table entry and all its state.
   */
  async delete(instance: number, kind?: StateKind): Promise<void> {
    if (kind === undefined) {
      await this.#console(instance, Ord.DELETE, encodeInstanceParam(instance));
      return;
    }
    await this.#call(instance, Ord.DELETE_STATE, Uint8Array.of(KIND_CODES[kind]));
    if (kind === 'volatile') this.#held.delete(instance);
  }

  // ---- console ---------------------------------------------------------------------------

  /** OPEN: no table entry → a new vTPM (created = true); an entry → resume it. */
  async open(o: OpenOptions): Promise<{ instance: number; created: boolean }> {
    const params = encodeOpen({
      migType: o.migratable === false ? MigType.NON_MIGRATABLE : MigType.MIGRATABLE,
      startup: o.startup ?? Startup.CLEAR,
      vmType: o.vmType ?? 1,
      instance: o.instance ?? 0,
      vmUuid: o.vmUuid.toLowerCase(),
      version: o.version,
      ...(o.ek === undefined ? {} : { ek: o.ek }),
    });
    return decodeOpenResult(await this.#console(0, Ord.OPEN, params));
  }

  /** CLOSE: the instance stays in the table (resumable); its state can no longer be saved. */
  async close(instance: number): Promise<void> {
    // The manager writes what it holds of the instance at CLOSE; a re-hold under way must land first.
    await this.#reconnecting?.catch(() => undefined);
    await this.#console(instance, Ord.CLOSE, encodeInstanceParam(instance));
    this.#held.delete(instance);
  }

  // ---- migration -------------------------------------------------------------------------

  /** GET_MIG_KEY: the manager's public migration key (made at its first use). */
  async migrationKey(): Promise<RsaPublic> {
    return decodeMigKey(await this.#call(0, Ord.GET_MIG_KEY));
  }

  /** LOAD_MIG_KEY: remember `key` as destination `name` (privileged). */
  async loadMigrationKey(name: string, key: RsaPublic): Promise<void> {
    await this.#privileged(0, Ord.LOAD_MIG_KEY, encodeLoadMigKey(name, key));
  }

  /**
   * MIGRATE_OUT: the vTPM's state sealed to destination `name`; the vTPM is then frozen here. `vm` is
   * an instance number or a VM uuid.
   */
  async migrateOut(vm: number | string, name: string): Promise<Buffer> {
    const params = typeof vm === 'number' ? encodeMigrateOut(vm, name) : encodeMigrateOut(0, name, vm.toLowerCase());
    return Buffer.from(await this.#privileged(typeof vm === 'number' ? vm : 0, Ord.MIGRATE_OUT, params));
  }

  /** MIGRATE_IN: registers the blob's VM here (instance 0: any free one); returns its instance. */
  async migrateIn(blob: Uint8Array, instance = 0): Promise<number> {
    const params = encodeMigrateIn(instance, blob);
    if (!this.opts.privileged && SRV_HEADER_SIZE + params.length > PIPE_BUF)
      throw new ManagerError('PROTOCOL', `a ${blob.length}-byte MIGRATE_IN does not fit the shared console FIFO (PIPE_BUF): connect with privileged: true`);
    return decodeInstanceParam(await this.#privileged(instance, Ord.MIGRATE_IN, params), 'MIGRATE_IN response');
  }

  /** On our own pair when it was attached through the console, else one exchange on the console. */
  #privileged(instance: number, ordinal: number, params: Uint8Array): Promise<Uint8Array> {
    return this.opts.privileged ? this.#call(instance, ordinal, params) : this.#console(instance, ordinal, params);
  }

  async #console(instance: number, ordinal: number, params: Uint8Array): Promise<Uint8Array> {
    const f = await withConsoleLock(this.runDir, () => consoleRequest(this.runDir, encodeRequest(0, ordinal, params)));
    if (f.code !== Status.SUCCESS) throw statusError(ordinal, instance, f.code);
    return f.params;
  }

  /** Drops our FIFO pair; the manager removes its files when it sees the end of our requests. */
  disconnect(): void {
    this.#closedByUs = true;
    this.#fail(new ManagerError('DISCONNECTED', 'client disconnected'));
  }
}

function statusError(ordinal: number, instance: number, status: number): ManagerError {
  return new ManagerError('STATUS', `${ordinalName(ordinal)} on instance ${instance}: ${STATUS_NAMES[status] ?? `status ${status}`}`, status);
}
