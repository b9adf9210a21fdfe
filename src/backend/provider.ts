// Where a backend gets a VM's vTPM from (docs/engine.md "Providers"): in-process instances (single-VM
// mode, InProcessVtpms) or vTPM-domain processes (multi-VM mode, MultiVmVtpms). One entry point opens
// the vTPM at the manager for either kind of user: a xenbus device (a guest session, exactly once on
// the ring) or a QEMU endpoint (the TPM itself, powered off until QEMU's CMD_INIT).
import type { SwtpmVtpm, VtpmTarget } from '../tpm/vtpm.js';
import type { TpmVersion } from '../tpm/wire.js';

/** A guest device's session on its vTPM. */
export type VtpmSession = VtpmTarget & { readonly instance: number };

/** `resume` keeps the saved volatile state (a guest resuming); `qemu` hands the TPM to a QEMU endpoint. */
export type OpenMode = { resume: boolean } | { qemu: true };

export class ProviderError extends Error {
  constructor(
    /** NO_QEMU: this provider's vTPMs live in other processes; ALREADY_ATTACHED: the VM's vTPM is in use. */
    readonly code: 'NO_QEMU' | 'ALREADY_ATTACHED',
    message: string,
  ) {
    super(message);
    this.name = 'ProviderError';
  }
}

export interface VtpmProvider {
  /** Open (create or resume) the VM's vTPM for a guest device. */
  open(vmUuid: string, version: TpmVersion, mode: { resume: boolean }): Promise<VtpmSession>;
  /** Open the VM's vTPM for QEMU, powered off, volatile state dropped; ProviderError NO_QEMU if this provider cannot. */
  open(vmUuid: string, version: TpmVersion, mode: { qemu: true }): Promise<SwtpmVtpm>;
  /** The user is gone: save what must survive and release the instance. */
  release(instance: number): Promise<void>;
}
