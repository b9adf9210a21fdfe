// What a guest's TPM driver does at boot (Linux's tpm2_auto_startup and tpm1_auto_startup): ask the TPM
// something harmless, and if it answers that it was never started (TPM 2.0 TPM_RC_INITIALIZE, TPM 1.2
// TPM_INVALID_POSTINIT), send Startup(CLEAR). Only at boot: a resumed guest's TPM carries on with the
// state it was suspended with, and a Startup(CLEAR) there would wipe its PCRs (docs/suspend-and-stress.md).
import { Marshal, command as tpmCommand, responseCode } from '../tpm/wire.js';
import * as tpm2 from '../tpm/tpm2-commands.js';
import * as tpm12 from '../tpm/tpm12-commands.js';

export const TPM2_CC_SelfTest = 0x143;
export const TPM2_RC_INITIALIZE = 0x100;
export const TPM_ORD_GetCapability = 0x65;
export const TPM_INVALID_POSTINIT = 0x26;
const TPM_CAP_PROPERTY = 5;
const TPM_CAP_PROP_TIS_TIMEOUT = 0x115;

export type StartupOutcome = 'started' | 'running' | 'failed';

export interface AutoStartupResult {
  version: '2.0' | '1.2';
  outcome: StartupOutcome;
  /** The response code that decided the outcome (Startup's when one was sent, else the probe's). */
  rc: number;
}

/** TPM2_SelfTest(fullTest = NO): what Linux's tpm2_do_selftest sends first. */
export function selfTest2(): Uint8Array {
  return tpmCommand(0x8001, TPM2_CC_SelfTest, new Marshal().u8(0));
}

/** TPM_GetCapability(TPM_CAP_PROPERTY, TIS_TIMEOUT): what Linux's tpm1_get_timeouts asks a 1.2 TPM first. */
export function getTimeouts12(): Uint8Array {
  return tpmCommand(0x00c1, TPM_ORD_GetCapability, new Marshal().u32(TPM_CAP_PROPERTY).u32(4).u32(TPM_CAP_PROP_TIS_TIMEOUT));
}

const isTpm2Response = (r: Uint8Array): boolean => r.length >= 2 && r[0] === 0x80 && (r[1] === 0x01 || r[1] === 0x02);

/** Probe, and Startup(CLEAR) a TPM that was never started. `transmit` is the guest's device. */
export async function autoStartup(transmit: (cmd: Uint8Array) => Promise<Uint8Array>): Promise<AutoStartupResult> {
  const probe = await transmit(selfTest2());
  if (isTpm2Response(probe)) {
    const rc = responseCode(probe);
    if (rc !== TPM2_RC_INITIALIZE) return { version: '2.0', outcome: 'running', rc };
    const s = responseCode(await transmit(tpm2.startup(tpm2.TPM_SU_CLEAR)));
    return { version: '2.0', outcome: s === 0 ? 'started' : 'failed', rc: s };
  }
  // A 1.2 TPM answers the 2.0 tag with TPM_BADTAG in its own family: ask it the 1.2 way.
  const rc = responseCode(await transmit(getTimeouts12()));
  if (rc !== TPM_INVALID_POSTINIT) return { version: '1.2', outcome: 'running', rc };
  const s = responseCode(await transmit(tpm12.startup(tpm12.TPM_ST_CLEAR)));
  return { version: '1.2', outcome: s === 0 ? 'started' : 'failed', rc: s };
}
