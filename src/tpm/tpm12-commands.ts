// TPM 1.2 commands the engine issues (startup, save state) and the PCR commands tests use.
// Layouts from TPM 1.2 Part 3; SHA-1 PCRs, 20-byte digests.
import { Marshal, TPM_TAG_RQU_COMMAND, command } from './wire.js';
import { expectSuccess } from './tpm2-commands.js';

export const TPM_ORD_Extend = 0x14;
export const TPM_ORD_PcrRead = 0x15;
export const TPM_ORD_SaveState = 0x98;
export const TPM_ORD_Startup = 0x99;
export const TPM_ORD_GetRandom = 0x46;

export const TPM_ST_CLEAR = 0x0001;
export const TPM_ST_STATE = 0x0002;
export const TPM_ST_DEACTIVATED = 0x0003;

export function startup(type: number = TPM_ST_CLEAR): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_Startup, new Marshal().u16(type));
}

export function saveState(): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_SaveState);
}

export function extend(pcr: number, digest: Uint8Array): Uint8Array {
  if (digest.length !== 20) throw new RangeError('TPM 1.2 digests are 20 bytes');
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_Extend, new Marshal().u32(pcr).bytes(digest));
}

export function pcrRead(pcr: number): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_PcrRead, new Marshal().u32(pcr));
}

export function getRandom(bytes: number): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_GetRandom, new Marshal().u32(bytes));
}

/** The 20-byte PCR value of an Extend or PcrRead response. */
export function parsePcrValue(resp: Uint8Array): Uint8Array {
  expectSuccess(resp, 'TPM 1.2 PCR command');
  return resp.slice(10, 30);
}
