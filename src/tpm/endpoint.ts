// What the backend needs from a vTPM, wherever it runs: an in-process TpmInstance (single-VM mode) or
// a VtpmDomain process (multi-VM mode) both implement it, so dispatch code does not care which.
import type { StateKind } from './state-store.js';

export interface TpmEndpoint {
  readonly instance: number;
  /** One TPM command; resolves with the response once its NV changes are durable. */
  execute(command: Uint8Array, opts?: { locality?: number }): Promise<Uint8Array>;
  /** Cancel the running command (it then answers TPM_RC_CANCELED if it was cancellable). */
  cancel(): void | Promise<void>;
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
