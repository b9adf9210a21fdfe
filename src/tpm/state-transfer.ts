// Moving a vTPM's state in and out in swtpm's state-blob format (CMD_GET_STATEBLOB, CMD_SET_STATEBLOB)
// and saving volatile state for suspend. Each runs as one operation of the instance's queue; state
// leaves only durable, as a response does, and a blob set lands durable before the TPM runs on it.
import { LibtpmsStateType, TPM_SUCCESS, type Libtpms } from '../../native/libtpms.js';
import { TpmInstanceError, type InstanceStatus } from './instance-types.js';
import type { NvState } from './nv-state.js';
import { decodeStateBlob, encodeStateBlob } from './state-blob.js';
import type { StateKind } from './state-store.js';

/** What the transfer needs of its instance: its queue, its library copy and its NV state. */
export interface InstanceAccess {
  instance(): number;
  status(): InstanceStatus;
  readonly nv: NvState;
  /** Run after every earlier operation of the instance, one at a time. */
  enqueue<T>(op: () => Promise<T>): Promise<T>;
  requireLib(): Libtpms;
  /** Run a library call under the host's limiter. */
  inLibrary<T>(fn: () => Promise<T>): Promise<T>;
}

const STATE_TYPE: Record<StateKind, LibtpmsStateType> = {
  permanent: LibtpmsStateType.PERMANENT,
  volatile: LibtpmsStateType.VOLATILE,
  savestate: LibtpmsStateType.SAVE_STATE,
};

export class StateTransfer {
  constructor(private readonly tpm: InstanceAccess) {}

  /** TPMLIB_VolatileAll_Store into the store (for suspend): resolves once it is durable. */
  saveVolatile(): Promise<void> {
    return this.tpm.enqueue(async () => {
      const lib = this.tpm.requireLib();
      if (this.tpm.status() !== 'running') throw new TpmInstanceError('NOT_RUNNING', this.tpm.instance(), 'TPM is not running');
      this.tpm.nv.put('volatile', await this.#volatileAll(lib));
      await this.tpm.nv.flush();
    });
  }

  /** TPMLIB_VolatileAll_Store: the running TPM's volatile state, now. */
  async #volatileAll(lib: Libtpms): Promise<Uint8Array> {
    const { rc, blob } = await this.tpm.inLibrary(async () => lib.volatileAllStore());
    if (rc !== TPM_SUCCESS || !blob) {
      throw new TpmInstanceError('LIBTPMS', this.tpm.instance(), `TPMLIB_VolatileAll_Store failed with 0x${rc.toString(16)}`, rc);
    }
    return blob;
  }

  /**
   * The state blob of `kind` exactly as swtpm's CMD_GET_STATEBLOB returns it unencrypted, or null when
   * there is no such state (swtpm answers TPM_RETRY 0x800 with an empty blob then). Volatile state of
   * a running TPM is taken fresh (TPMLIB_VolatileAll_Store), as swtpm does.
   */
  get(kind: StateKind): Promise<Uint8Array | null> {
    return this.tpm.enqueue(async () => {
      const lib = this.tpm.requireLib();
      // State leaves the instance only once durable, like a response (create's Startup may still write).
      await this.tpm.nv.flush();
      if (kind === 'volatile' && this.tpm.status() === 'running') {
        return encodeStateBlob(await this.#volatileAll(lib));
      }
      const plain = this.tpm.nv.get(kind);
      return plain ? encodeStateBlob(plain) : null;
    });
  }

  /**
   * Install a blob in swtpm's format (an empty blob clears that kind), validated by libtpms
   * (TPMLIB_SetState). Only while powered off, as with swtpm; the next powerOn() makes it durable and
   * starts from it.
   */
  set(kind: StateKind, blob: Uint8Array): Promise<void> {
    return this.tpm.enqueue(async () => {
      if (this.tpm.status() === 'running') {
        throw new TpmInstanceError('RUNNING', this.tpm.instance(), 'state blobs can only be set while the TPM is off');
      }
      if (this.tpm.status() === 'failed') {
        throw new TpmInstanceError('FAILED', this.tpm.instance(), 'instance failed; recreate() it first');
      }
      const lib = this.tpm.requireLib();
      const plain = decodeStateBlob(blob);
      // A failed write fails the instance (NvState): only `ready` matters here.
      if (plain && kind !== 'permanent' && !this.tpm.nv.has('permanent')) await this.tpm.nv.sync().ready;
      const rc = lib.setState(STATE_TYPE[kind], plain);
      if (rc !== TPM_SUCCESS) {
        throw new TpmInstanceError('LIBTPMS', this.tpm.instance(), `TPMLIB_SetState(${kind}) refused the blob: 0x${rc.toString(16)}`, rc);
      }
      // Durable at the next powerOn() (NvState.sync), which runs nothing before it is: the blobs of one
      // restore (permanent, volatile) then reach the store together.
      this.tpm.nv.put(kind, plain);
    });
  }
}
