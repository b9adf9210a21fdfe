// What a command does to a TPM's volatile state, as the exactly-once session needs to know it
// (docs/engine.md "Exactly once"): `none` changes nothing a restore must bring back (reads, and
// GetRandom, whose DRBG is stirred with fresh entropy after every restore), `replay` changes it
// deterministically (PCR_Extend with no session or only password sessions: the same bytes on the same
// state give the same state), `full` anything else (sessions with nonces, objects, keys, hierarchy
// changes), which needs a copy of the whole volatile state.
import { Marshal, TPM2_ST_NO_SESSIONS, TPM2_ST_SESSIONS, TPM_TAG_RQU_COMMAND as TPM12_TAG_RQU_COMMAND, command, readHeader, type TpmVersion } from './wire.js';
import { TPM_RS_PW } from './tpm2-commands.js';

export type VolatileEffect = 'none' | 'replay' | 'full';


const TPM2_NONE = new Set([
  0x17a, // GetCapability
  0x17b, // GetRandom
  0x17e, // PCR_Read
  0x181, // ReadClock
]);
const TPM2_PCR_EXTEND = 0x182;
const TPM12_NONE = new Set([
  0x15, // TPM_PCRRead
  0x46, // TPM_GetRandom
  0x65, // TPM_GetCapability
]);
const TPM12_EXTEND = 0x14;

export function volatileEffect(version: TpmVersion, command: Uint8Array): VolatileEffect {
  const h = readHeader(command);
  if (!h || h.size !== command.length) return 'full';
  if (version === '1.2') {
    if (h.tag !== TPM12_TAG_RQU_COMMAND) return 'full';
    if (TPM12_NONE.has(h.code)) return 'none';
    return h.code === TPM12_EXTEND ? 'replay' : 'full';
  }
  if (h.tag === TPM2_ST_NO_SESSIONS && TPM2_NONE.has(h.code)) return 'none';
  if (h.code === TPM2_PCR_EXTEND && h.tag === TPM2_ST_SESSIONS && onlyPasswordSessions(command, 1)) return 'replay';
  return 'full';
}

/** The authorization area after `handles` handles holds only TPM_RS_PW sessions (no nonces, no state). */
function onlyPasswordSessions(command: Uint8Array, handles: number): boolean {
  const v = new DataView(command.buffer, command.byteOffset, command.byteLength);
  let off = 10 + 4 * handles;
  if (off + 4 > command.length) return false;
  const end = off + 4 + v.getUint32(off);
  off += 4;
  if (end > command.length || end === off) return false;
  while (off < end) {
    if (off + 9 > end || v.getUint32(off) !== TPM_RS_PW) return false;
    off += 4;
    off += 2 + v.getUint16(off); // nonce
    off += 1; // attributes
    if (off + 2 > end) return false;
    off += 2 + v.getUint16(off); // hmac: the password
  }
  return off === end;
}

/** TPM2_StirRandom / TPM_StirRandom with `entropy` (≤ 128 bytes): after a restore, the DRBG never repeats an answer. */
export function stirRandom(version: TpmVersion, entropy: Uint8Array): Uint8Array {
  const data = entropy.subarray(0, 128);
  return version === '2.0'
    ? command(TPM2_ST_NO_SESSIONS, 0x146, new Marshal().tpm2b(data))
    : command(TPM12_TAG_RQU_COMMAND, 0x47, new Marshal().u32(data.length).bytes(data));
}
