// The destination side of a local live migration (`vtpm qemu attach --incoming`, docs/qemu.md): a second
// endpoint for a VM whose vTPM another endpoint (the source) still serves. Until the destination QEMU
// runs, its endpoint only collects what QEMU's post_load sends (buffer size, state blobs) and the vTPM
// stays the source's. The destination's CMD_INIT is the hand-over: the source endpoint is fenced (it
// answers errors and closes), then the collected blobs are installed in the vTPM and it is powered on
// from them, durably, before INIT answers. So two QEMUs never drive the vTPM at once, and a
// destination that dies before its INIT leaves the source serving as if nothing happened.
import type { ExecuteOptions, SwtpmVtpm } from '../tpm/vtpm.js';
import { decodeStateBlob } from '../tpm/state-blob.js';
import { errorResponse, fatalErrorCode } from '../tpm/error-response.js';
import type { StateKind } from '../tpm/state-store.js';

export class IncomingError extends Error {
  constructor(
    readonly code: 'NO_STATE' | 'NOT_OWNER',
    message: string,
  ) {
    super(message);
    this.name = 'IncomingError';
  }
}

/**
 * The destination endpoint's vTPM: off and state-less until `claim()` (which fences the source) has
 * handed it the VM's instance; from then every call goes to that instance.
 */
export class IncomingVtpm implements SwtpmVtpm {
  readonly #target: SwtpmVtpm;
  readonly #claim: () => Promise<void>;
  readonly #blobs = new Map<StateKind, Uint8Array>();
  #wantedBuffer = 0;
  #owner = false;

  /** `claim` fences the source endpoint and makes this node the owner; it throws if it cannot. */
  constructor(target: SwtpmVtpm, claim: () => Promise<void>) {
    this.#target = target;
    this.#claim = claim;
  }

  get instance(): number {
    return this.#target.instance;
  }

  get version(): '2.0' | '1.2' {
    return this.#target.version;
  }

  get status(): string {
    return this.#owner ? this.#target.status : 'off';
  }

  get bufferSize(): number {
    return this.#owner || this.#wantedBuffer === 0 ? this.#target.bufferSize : this.#wantedBuffer;
  }

  execute(command: Uint8Array, opts?: ExecuteOptions): Promise<Uint8Array> {
    // Off, as a TPM before INIT: QEMU's version probe gets the fatal error it expects.
    if (!this.#owner) return Promise.resolve(errorResponse(this.version, fatalErrorCode(this.version)));
    return this.#target.execute(command, opts);
  }

  cancel(): void {
    if (this.#owner) this.#target.cancel();
  }

  /** Before the hand-over the TPM is off: TPM_RC_FAILURE, as a command to it gets. */
  async startup(type?: 'clear' | 'state'): Promise<number> {
    return this.#owner ? this.#target.startup(type) : fatalErrorCode(this.version);
  }

  async reset(): Promise<void> {
    if (this.#owner) await this.#target.reset();
  }

  /** INIT: the hand-over (first time), then an ordinary power-on. */
  async powerOn(): Promise<void> {
    if (this.#owner) return this.#target.powerOn();
    const perm = this.#blobs.get('permanent');
    if (!perm) throw new IncomingError('NO_STATE', 'an incoming endpoint starts only from migrated state (no permanent state blob was set)');
    await this.#claim();
    this.#owner = true;
    const t = this.#target;
    try {
      await t.powerOff();
      if (this.#wantedBuffer !== 0) t.setBufferSize(this.#wantedBuffer);
      // A kind QEMU did not send is cleared: the destination runs on the migrated state alone.
      for (const kind of ['permanent', 'volatile', 'savestate'] as const) {
        await t.setStateBlob(kind, this.#blobs.get(kind) ?? new Uint8Array(0));
      }
      // Durable before INIT answers (power-on commits what was set).
      await t.powerOn();
    } catch (err) {
      // libtpms refused a blob (or the store failed): back to the last durable state, powered off as
      // before any INIT. The source stays fenced; its QEMU has handed the VM over already.
      await t
        .recreate()
        .then(() => t.powerOff())
        .catch(() => undefined);
      throw err;
    } finally {
      this.#blobs.clear();
    }
  }

  async powerOff(): Promise<void> {
    if (this.#owner) await this.#target.powerOff();
  }

  async recreate(): Promise<void> {
    if (!this.#owner) return this.powerOn();
    return this.#target.recreate();
  }

  async saveVolatile(): Promise<void> {
    if (!this.#owner) throw new IncomingError('NOT_OWNER', 'the vTPM is still served by the source endpoint');
    return this.#target.saveVolatile();
  }

  async getStateBlob(kind: StateKind): Promise<Uint8Array | null> {
    // Nothing of the source's state is readable here: like a fresh swtpm with an empty state dir.
    return this.#owner ? this.#target.getStateBlob(kind) : null;
  }

  async setStateBlob(kind: StateKind, blob: Uint8Array): Promise<void> {
    if (this.#owner) return this.#target.setStateBlob(kind, blob);
    // The header checks now (their errors are swtpm's), libtpms' own at the hand-over.
    decodeStateBlob(blob);
    this.#blobs.set(kind, blob.slice());
  }

  setBufferSize(wanted: number): { size: number; min: number; max: number } {
    if (this.#owner) return this.#target.setBufferSize(wanted);
    const r = this.#target.setBufferSize(0);
    if (wanted !== 0) this.#wantedBuffer = Math.min(Math.max(wanted, r.min), r.max);
    return { ...r, size: this.#wantedBuffer || r.size };
  }

  info(flags: number): string {
    return this.#target.info(flags);
  }
}
