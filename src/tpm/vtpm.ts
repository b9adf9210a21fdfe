// One vTPM, wherever it runs (docs/engine.md "One vTPM interface"): an in-process libtpms instance
// (TpmInstance, single-VM mode) or a vTPM-domain process (VtpmDomain, multi-VM mode). Everything that
// drives a TPM drives this: the backend's channels through an exactly-once session over it, the QEMU
// endpoint through the swtpm controls below.
import type { StateKind } from './state-store.js';
import type { TpmVersion } from './wire.js';

export interface ExecuteOptions {
  locality?: number;
  /**
   * The ring request id this command answers (multi-VM mode forwards a guest's id to its domain, whose
   * exactly-once table then answers a resubmission without running it again). 0 or absent: none.
   */
  id?: bigint;
}

export interface Vtpm {
  readonly instance: number;
  readonly version: TpmVersion;
  /** One TPM command; resolves with the response once its NV changes are durable. */
  execute(command: Uint8Array, opts?: ExecuteOptions): Promise<Uint8Array>;
  /** Ask the running command, if any, to stop early (TPMLIB_CancelCommand); it still resolves. */
  cancel(): void;
  /** TPM(2)_Startup; resolves with the response code. */
  startup(type?: 'clear' | 'state'): Promise<number>;
  /** TPMLIB_VolatileAll_Store into the store (suspend). */
  saveVolatile(): Promise<void>;
  getStateBlob(kind: StateKind): Promise<Uint8Array | null>;
  setStateBlob(kind: StateKind, blob: Uint8Array): Promise<void>;
  powerOn(): Promise<void>;
  powerOff(): Promise<void>;
  reset(): Promise<void>;
}

/** What swtpm's control channel adds to a TPM (QEMU's endpoint needs it): an in-process instance has it. */
export interface SwtpmVtpm extends Vtpm {
  readonly status: string;
  readonly bufferSize: number;
  /** Rebuild the TPM from its durable state (after failure mode). */
  recreate(): Promise<void>;
  setBufferSize(wanted: number): { size: number; min: number; max: number };
  info(flags: number): string;
}

/** A ring request as an exactly-once session takes it. */
export interface OnceRequest {
  id: bigint;
  command: Uint8Array;
  locality: number;
}

export interface Completed {
  status: number;
  response: Uint8Array;
}

/**
 * What a backend channel drives: a guest's session on its vTPM. Commands arrive one at a time per
 * session. The optional members are the exactly-once session's (src/backend/exactly-once.ts); a session
 * without them runs every request as it comes.
 */
export interface VtpmTarget {
  /** Run one command at `locality` (with the ring request id, if any); resolves once its NV writes are durable. */
  execute(command: Uint8Array, opts: { locality: number; id?: bigint }): Promise<Uint8Array>;
  cancel(): void;
  /** The stored answer of a request id that already completed, across suspend/resume and restarts. */
  completed?(id: bigint): Completed | undefined;
  /**
   * Run ring requests once each, several under one checkpoint (group commit): `first`, then whatever
   * `more` still hands over (asked with a predicate saying which commands may join). Resolves with their
   * responses, in order, once their answers, ids and the vTPM's volatile state are held safely together.
   */
  executeGroup?(
    first: OnceRequest,
    more: (joins: (command: Uint8Array) => boolean) => OnceRequest | undefined,
    status: (request: OnceRequest, response: Uint8Array) => number,
  ): Promise<Uint8Array[]>;
  /** Make the vTPM's volatile state durable at the manager (suspend); nothing to do if it already is. */
  checkpoint?(): Promise<void>;
}
