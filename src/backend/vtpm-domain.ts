// The backend's handle on a vTPM-domain process (docs/multi-vm.md): one Vtpm whose TPM commands go
// over the shared-memory ring the backend granted to the domain (RingFront; the domain serves it with
// RingChannel and its exactly-once session), and whose lifecycle (READY, STOP, Startup, SAVE_VOLATILE,
// HEALTH, state blobs) goes over frames on the process's stdin/stdout, as a toolstack drives a stub
// domain. It learns at once when the process dies (exit or kill -9): 'crash' for an exit nobody asked for.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { EventEmitter } from 'node:events';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RingFront } from '../tpmif/ring-front.js';
import type { ExecuteOptions, Vtpm } from '../tpm/vtpm.js';
import type { TpmVersion } from '../tpm/wire.js';
import type { FailureInfo } from '../tpm/instance-types.js';
import { BLOB_TYPE } from '../tpm/state-blob.js';
import type { StateKind } from '../tpm/state-store.js';
import { domainEnv } from './domain-flags.js';
import { DomainMsg, FrameReader, decodeJson, encodeFrame, type DomainHealth, type Frame } from '../tpm/domain-protocol.js';

interface DomainCommon {
  instance: number;
  domid: number;
  version: TpmVersion;
  /** How long to wait for READY (default 10 s). */
  startTimeoutMs?: number;
  /** The domain's hypercall connection, handed to the process as fd 3 (VTPM_HV_FD) and closed here. */
  hvFd: number;
  /** How to exec the domain (e.g. under its own uid, src/cli/isolation.ts); default node directly. */
  launch?: DomainLaunch;
  /** The manager pair's request and response ends the domain inherits as fds 4 and 5; close yours in `onSpawned`. */
  managerFds?: [number, number];
  onSpawned?: () => void;
  /** Node options before the entry script (V8 heap limits for a lean domain, docs/multi-vm.md). */
  nodeFlags?: string[];
}

/** A multi-VM domain: vtpm-domain-main.js serving the ring the backend granted it. */
export interface RingDomainStart extends DomainCommon {
  /** The ring the backend (domain `frontDomid`) granted to this domain; commands go over it. */
  front: RingFront;
  frontDomid: number;
  vm: string;
  managerRunDir: string;
  xenDir: string;
  /** Where the domain registers itself while it runs. */
  registerDir?: string;
}

/**
 * Another entry point speaking the same control frames, with no ring from dom0: a stub domain
 * (stubdom-main.js) is its guest's device backend, so its TPM is reached only through that device.
 */
export interface EntryDomainStart extends DomainCommon {
  entry: { script: string; args: string[] };
}

export type DomainStartOptions = RingDomainStart | EntryDomainStart;

/** Turns `node argv…` into the command that runs it as the domain (a privilege-dropping wrapper). */
export type DomainLaunch = (domid: number, file: string, args: string[]) => { file: string; args: string[] };

export interface DomainExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when stop() asked for it. */
  expected: boolean;
}

export type DomainErrorCode = 'START' | 'CRASHED' | 'TIMEOUT' | 'REMOTE' | 'STOPPED' | 'NO_RING';

export class DomainError extends Error {
  constructor(
    readonly code: DomainErrorCode,
    message: string,
    /** For REMOTE: the code the domain reported (e.g. a TpmInstanceError code). */
    readonly remoteCode?: string,
  ) {
    super(message);
    this.name = 'DomainError';
  }
}

// The domain's one entry point; when this module runs from source (tests), use the build in dist/.
const here = dirname(fileURLToPath(import.meta.url));
export const VTPM_DOMAIN_MAIN = import.meta.url.endsWith('.ts')
  ? join(here, '../../dist/src/backend/vtpm-domain-main.js')
  : join(here, 'vtpm-domain-main.js');

// prettier-ignore
function ringArgs(opts: RingDomainStart): string[] {
  return [
    VTPM_DOMAIN_MAIN,
    '--instance', String(opts.instance),
    '--domid', String(opts.domid),
    '--tpm-version', opts.version,
    '--vm', opts.vm,
    '--manager-run', opts.managerRunDir,
    '--xen-dir', opts.xenDir,
    '--front-domid', String(opts.frontDomid),
    '--ring-ref', String(opts.front.refs[0]),
    '--event-channel', String(opts.front.port),
    ...(opts.registerDir ? ['--register-dir', opts.registerDir] : []),
    // After the hypercall connection (fd 3): the manager pair's request and response ends.
    ...(opts.managerFds ? ['--manager-fds', '4,5'] : []),
  ];
}

interface Pending {
  resolve: (payload: Uint8Array) => void;
  reject: (err: Error) => void;
}

/**
 * Events: 'exit' (DomainExit) always; 'crash' (DomainExit) when the exit was not requested;
 * 'failure' (FailureInfo) when the TPM inside enters failure mode.
 */
export class VtpmDomain extends EventEmitter implements Vtpm {
  readonly instance: number;
  readonly version: TpmVersion;
  readonly domid: number;
  /** Null for an entry-point domain (a stub domain): no ring from dom0. */
  readonly front: RingFront | null;
  readonly #child: ChildProcess;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #stopping = false;
  #exited: DomainExit | null = null;
  readonly #exitPromise: Promise<DomainExit>;

  private constructor(opts: DomainStartOptions, child: ChildProcess) {
    super();
    this.instance = opts.instance;
    this.version = opts.version;
    this.domid = opts.domid;
    this.front = 'front' in opts ? opts.front : null;
    this.#child = child;
    this.#exitPromise = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        const ex: DomainExit = { code, signal, expected: this.#stopping };
        this.#exited = ex;
        const err = new DomainError(
          this.#stopping ? 'STOPPED' : 'CRASHED',
          `vTPM domain ${this.domid} (pid ${child.pid}) exited (code ${code}, signal ${signal})`,
        );
        for (const p of this.#pending.values()) p.reject(err);
        this.#pending.clear();
        this.emit('exit', ex);
        if (!ex.expected) this.emit('crash', ex);
        resolve(ex);
      });
    });
  }

  get pid(): number {
    return this.#child.pid ?? -1;
  }

  get alive(): boolean {
    return this.#exited === null;
  }

  /** Spawn `node vtpm-domain-main.js …` on the ring (or the given entry point) and wait for its READY. */
  static async start(opts: DomainStartOptions): Promise<VtpmDomain> {
    const argv = [...(opts.nodeFlags ?? []), ...('entry' in opts ? [opts.entry.script, ...opts.entry.args] : ringArgs(opts))];
    const l = opts.launch ? opts.launch(opts.domid, process.execPath, argv) : { file: process.execPath, args: argv };
    let child: ChildProcess;
    try {
      // cwd /: a domain under its own uid may not be allowed into the backend's working directory.
      child = spawn(l.file, l.args, {
        stdio: ['pipe', 'pipe', 'inherit', opts.hvFd, ...(opts.managerFds ?? [])],
        env: { ...domainEnv(), VTPM_HV_FD: '3' },
        cwd: '/',
      });
    } finally {
      fs.closeSync(opts.hvFd);
      opts.onSpawned?.();
    }
    const dom = new VtpmDomain(opts, child);
    const ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new DomainError('TIMEOUT', `vTPM domain ${opts.domid} not ready in time`));
        child.kill('SIGKILL');
      }, opts.startTimeoutMs ?? 10_000);
      dom.once('_ready', () => {
        clearTimeout(timer);
        resolve();
      });
      dom.once('_startError', (msg: string) => {
        clearTimeout(timer);
        reject(new DomainError('START', msg));
      });
      dom.once('exit', (ex: DomainExit) => {
        clearTimeout(timer);
        reject(new DomainError('START', `vTPM domain ${opts.domid} exited during start (code ${ex.code}, signal ${ex.signal})`));
      });
    });
    const reader = new FrameReader();
    child.stdout!.on('data', (c: Buffer) => {
      let frames: Frame[];
      try {
        frames = reader.push(new Uint8Array(c.buffer, c.byteOffset, c.byteLength));
      } catch {
        // The child broke the protocol: it cannot be trusted any more.
        child.kill('SIGKILL');
        return;
      }
      for (const f of frames) dom.#onFrame(f);
    });
    // Writes to a child that died fail with EPIPE; the exit event reports it.
    child.stdin!.on('error', () => undefined);
    await ready;
    return dom;
  }

  #onFrame(f: Frame): void {
    if (f.id === 0) {
      if (f.type === DomainMsg.READY) this.emit('_ready');
      else if (f.type === DomainMsg.FAILURE) this.emit('failure', decodeJson<FailureInfo>(f.payload));
      else if (f.type === DomainMsg.ERROR) this.emit('_startError', decodeJson<{ message: string }>(f.payload).message);
      return;
    }
    const p = this.#pending.get(f.id);
    if (!p) return;
    this.#pending.delete(f.id);
    if (f.type === DomainMsg.OK) p.resolve(f.payload);
    else {
      const body = decodeJson<{ code: string; message: string }>(f.payload);
      p.reject(new DomainError('REMOTE', body.message, body.code));
    }
  }

  #request(type: DomainMsg, payload?: Uint8Array, timeoutMs?: number): Promise<Uint8Array> {
    if (this.#exited) return Promise.reject(new DomainError('CRASHED', `vTPM domain ${this.domid} is not running`));
    const id = this.#nextId++ >>> 0 || this.#nextId++;
    return new Promise<Uint8Array>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = <T>(f: (x: T) => void) => (x: T) => {
        if (timer) clearTimeout(timer);
        f(x);
      };
      this.#pending.set(id, { resolve: done(resolve), reject: done(reject) });
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.#pending.delete(id);
          reject(new DomainError('TIMEOUT', `vTPM domain ${this.domid}: no answer in ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this.#child.stdin!.write(encodeFrame(type, id, payload));
    });
  }

  /** Over the ring; a guest's request id travels with it so the domain's exactly-once table sees it. */
  execute(command: Uint8Array, opts: ExecuteOptions = {}): Promise<Uint8Array> {
    if (!this.front) return Promise.reject(new DomainError('NO_RING', `vTPM domain ${this.domid} has no ring from dom0: its TPM is reached through the device it serves`));
    // Id 0 tells the domain "no id": a fresh ring id must never alias an id its table holds.
    return this.front.transmit(command, { locality: opts.locality ?? 0, id: opts.id ?? 0n });
  }

  cancel(): void {
    this.front?.cancel();
  }

  /** Resolves with the domain's health, or rejects with TIMEOUT if it does not answer in time. */
  async health(timeoutMs = 2000): Promise<DomainHealth> {
    return decodeJson<DomainHealth>(await this.#request(DomainMsg.HEALTH, undefined, timeoutMs));
  }

  async startup(type: 'clear' | 'state' = 'clear'): Promise<number> {
    const r = await this.#request(DomainMsg.STARTUP, Uint8Array.of(type === 'state' ? 1 : 0));
    return new DataView(r.buffer, r.byteOffset, 4).getUint32(0);
  }

  async powerOn(): Promise<void> {
    await this.#request(DomainMsg.POWER_ON);
  }

  async powerOff(): Promise<void> {
    await this.#request(DomainMsg.POWER_OFF);
  }

  async reset(): Promise<void> {
    await this.#request(DomainMsg.RESET);
  }

  async saveVolatile(): Promise<void> {
    await this.#request(DomainMsg.SAVE_VOLATILE);
  }

  async getStateBlob(kind: StateKind): Promise<Uint8Array | null> {
    const r = await this.#request(DomainMsg.GET_BLOB, Uint8Array.of(BLOB_TYPE[kind]));
    return r.length ? r : null;
  }

  async setStateBlob(kind: StateKind, blob: Uint8Array): Promise<void> {
    const payload = new Uint8Array(1 + blob.length);
    payload[0] = BLOB_TYPE[kind];
    payload.set(blob, 1);
    await this.#request(DomainMsg.SET_BLOB, payload);
  }

  /** Graceful stop: the domain powers its TPM off and exits; SIGKILL if it has not after timeoutMs. */
  async stop(timeoutMs = 5000): Promise<DomainExit> {
    if (this.#exited) return this.#exited;
    this.#stopping = true;
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), timeoutMs);
    this.#request(DomainMsg.STOP).catch(() => undefined);
    const ex = await this.#exitPromise;
    clearTimeout(timer);
    return ex;
  }

  /** Resolves when the process has exited, however it ended. */
  exited(): Promise<DomainExit> {
    return this.#exitPromise;
  }
}
