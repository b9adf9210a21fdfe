// Process-wide koffi settings. koffi refuses changes once any library is loaded, so every native/
// module imports this first. libtpms runs RSA key generation and the whole TPM 2 command dispatcher on
// the stack koffi gives async calls; the 128 KiB default is too tight for that, so give them 1 MiB
// (virtual: only touched pages cost memory). max_async_calls bounds queued async calls (4096 = max).
import koffi from './koffi.js';

const cfg = koffi.config() as Record<string, number>;
if ((cfg['async_stack_size'] ?? 0) < 1 << 20) {
  koffi.config({ ...cfg, async_stack_size: 1 << 20, max_async_calls: 4096 });
}
