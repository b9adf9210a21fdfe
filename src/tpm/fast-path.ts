// Commands cheap enough to run on the JS thread. A koffi async call costs a thread-pool round trip
// (measured 40–200 µs here, depending on load), while these commands spend ~5–15 µs in libtpms
// whatever their arguments: no key generation, no asymmetric crypto, bounded input. Running them
// inline cannot hold the event loop long enough to delay another instance noticeably; everything
// else always goes to the pool. Off unless the host is created with `inline: 'fast'`.
import { readHeader, type TpmVersion } from './wire.js';

const MAX_INLINE_COMMAND = 512;
const MAX_INLINE_RANDOM = 64;

const TPM2_FAST = new Set([
  0x17a, // GetCapability
  0x17b, // GetRandom (size checked below)
  0x17e, // PCR_Read
  0x181, // ReadClock
  0x182, // PCR_Extend
]);
const TPM12_FAST = new Set([
  0x14, // TPM_Extend
  0x15, // TPM_PCRRead
  0x46, // TPM_GetRandom (size checked below)
]);

export function isFastCommand(version: TpmVersion, command: Uint8Array): boolean {
  if (command.length > MAX_INLINE_COMMAND) return false;
  const h = readHeader(command);
  if (!h || h.size !== command.length) return false;
  const v = new DataView(command.buffer, command.byteOffset, command.byteLength);
  if (version === '2.0') {
    if (!TPM2_FAST.has(h.code)) return false;
    return h.code !== 0x17b || (command.length >= 12 && v.getUint16(10) <= MAX_INLINE_RANDOM);
  }
  if (!TPM12_FAST.has(h.code)) return false;
  return h.code !== 0x46 || (command.length >= 14 && v.getUint32(10) <= MAX_INLINE_RANDOM);
}
