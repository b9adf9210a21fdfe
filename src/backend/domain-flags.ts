// Node options for a vTPM-domain process (multi and stubdom modes). A domain holds one TPM and a few
// buffers; V8's defaults size its heaps for a server (docs/multi-vm.md, "A lean domain"): a 1 MiB
// young generation instead of 8 (16 MiB committed at worst), an old generation capped far above what one
// TPM needs, gc() for collecting start-up garbage (src/util/heap.ts), and --lite-mode: no optimising
// compiler and lazier feedback (~2.5 MiB less per domain; its per-command JS is small next to libtpms),
// and --single-threaded: no V8 helper threads to wake for a collection of a heap this small. Lite mode
// has no WebAssembly; --no-expose-wasm says so, or V8 warns on stderr (the backend's log) at every start.
// VTPM_DOMAIN_NODE_FLAGS replaces them (space-separated; empty: node's defaults).
import { FS_RESERVE } from '../tpm/threadpool.js';

export const DEFAULT_DOMAIN_NODE_FLAGS = ['--max-semi-space-size=1', '--max-old-space-size=64', '--expose-gc', '--lite-mode', '--no-expose-wasm', '--single-threaded'];

/**
 * Libuv threads a domain starts: its one TPM runs a slow command (key generation) on one of them, and
 * FS_RESERVE stay free for fs work (src/tpm/threadpool.ts). The fast commands run inline.
 */
export const DOMAIN_THREADPOOL_SIZE = FS_RESERVE + 1;

/**
 * The environment of a vTPM-domain process. glibc gives every thread that allocates its own malloc
 * arena (each keeping ~1–2 MiB dirty); a domain's threads rarely allocate at once, so they share one
 * (MALLOC_ARENA_MAX, unless set already). Fewer libuv threads, as above.
 */
export function domainEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return { ...env, UV_THREADPOOL_SIZE: String(DOMAIN_THREADPOOL_SIZE), MALLOC_ARENA_MAX: env.MALLOC_ARENA_MAX ?? '1' };
}

export function domainNodeFlags(env: NodeJS.ProcessEnv = process.env): string[] {
  const v = env.VTPM_DOMAIN_NODE_FLAGS;
  if (v === undefined) return DEFAULT_DOMAIN_NODE_FLAGS;
  return v.split(/\s+/).filter((f) => f !== '');
}
