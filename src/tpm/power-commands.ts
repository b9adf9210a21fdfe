// The Startup and Shutdown commands of either TPM version, as a platform sends them around power changes.
import * as tpm12 from './tpm12-commands.js';
import * as tpm2 from './tpm2-commands.js';
import type { TpmVersion } from './wire.js';

/** TPM2_Startup(SU_CLEAR|SU_STATE) or TPM_Startup(ST_CLEAR|ST_STATE). */
export function startupCommand(version: TpmVersion, type: 'clear' | 'state'): Uint8Array {
  return version === '2.0'
    ? tpm2.startup(type === 'clear' ? tpm2.TPM_SU_CLEAR : tpm2.TPM_SU_STATE)
    : tpm12.startup(type === 'clear' ? tpm12.TPM_ST_CLEAR : tpm12.TPM_ST_STATE);
}

/** TPM2_Shutdown(SU_CLEAR|SU_STATE); for 1.2, TPM_SaveState for 'state' and nothing for 'clear' (1.2 has no Shutdown). */
export function shutdownCommand(version: TpmVersion, type: 'clear' | 'state'): Uint8Array | null {
  if (version === '1.2') return type === 'clear' ? null : tpm12.saveState();
  return tpm2.shutdown(type === 'clear' ? tpm2.TPM_SU_CLEAR : tpm2.TPM_SU_STATE);
}
