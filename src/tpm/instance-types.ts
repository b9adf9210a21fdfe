// The vocabulary of one vTPM instance: its options, status, failure record and errors.
import type { StateStore } from './state-store.js';
import type { TpmVersion } from './wire.js';

export interface InstanceOptions {
  /** The instance number: the key of its state in the store. */
  instance: number;
  version: TpmVersion;
  store: StateStore;
  /** libtpms' command/response buffer (clamped by libtpms to its range); default 4096 like QEMU's TIS. */
  bufferSize?: number;
  /**
   * 'never' (default): every command runs on the thread pool. 'fast': the constant-time commands of
   * fast-path.ts (GetRandom ≤ 64 B, PCR_Extend, PCR_Read, GetCapability, ReadClock) run inline.
   */
  inline?: 'never' | 'fast';
}

export interface ExecuteOptions {
  /** Locality the command arrived on, 0..4; libtpms reads it through its getlocality callback. */
  locality?: number;
}

export type InstanceStatus = 'off' | 'running' | 'failed' | 'destroyed';

export type InstanceErrorCode =
  | 'DESTROYED' // the instance was destroyed
  | 'RUNNING' // needs a powered-off TPM (state blobs are set while off, as swtpm requires)
  | 'NOT_RUNNING' // needs a powered-on TPM
  | 'FAILED' // the instance is in failure mode; recreate() it
  | 'INIT' // TPMLIB_MainInit failed (e.g. corrupt state)
  | 'LIBTPMS' // another libtpms call failed
  | 'STORE' // the StateStore rejected a write; the response was withheld
  | 'LOCALITY'; // locality outside 0..4

export class TpmInstanceError extends Error {
  constructor(
    readonly code: InstanceErrorCode,
    readonly instance: number,
    message: string,
    readonly tpmResult?: number,
  ) {
    super(`vTPM ${instance}: ${message}`);
    this.name = 'TpmInstanceError';
  }
}

export interface FailureInfo {
  instance: number;
  reason: 'failure-mode' | 'init' | 'store';
  /** TPM response code / libtpms result that showed the failure, when there was one. */
  tpmResult?: number;
  message: string;
}

/** libtpms buffer size when none is asked for (QEMU TIS uses 4096); spares are made with it. */
export const DEFAULT_BUFFER_SIZE = 4096;

export function checkInstanceNumber(n: number): void {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`bad instance ${n}`);
}
