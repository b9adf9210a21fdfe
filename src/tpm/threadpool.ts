// Sizing libuv's thread pool for the engine. TPM commands run as koffi async calls on that pool, and
// libuv reads UV_THREADPOOL_SIZE once, when the pool first starts; in an ESM program the module loader
// already started it before any of our code runs, so the size must be in the environment when the
// process is exec()ed. Processes we spawn get engineEnv(); scripts/vtpm exports it for the CLI.
//
// Why 16: the libtpms calls we bound to (size − FS_RESERVE) are mostly CPU-bound; the pool only needs
// more threads than cores so one long RSA key generation (hundreds of ms) never leaves a short command
// waiting for a thread, and a thread costs ~8 MB of address space but only the stack it touches.
export const ENGINE_THREADPOOL_SIZE = 16;
/** Pool threads kept free of TPM work for fs (store writes/fsyncs), dns and crypto. */
export const FS_RESERVE = 2;
/** libuv's default pool when UV_THREADPOOL_SIZE is unset or invalid. */
const LIBUV_DEFAULT = 4;
const LIBUV_MAX = 1024;

/** The pool size libuv uses in this process (it read the same variable at start-up). */
export function threadPoolSize(env: NodeJS.ProcessEnv = process.env): number {
  const n = Number.parseInt(env['UV_THREADPOOL_SIZE'] ?? '', 10);
  if (!Number.isFinite(n) || n <= 0) return LIBUV_DEFAULT;
  return Math.min(n, LIBUV_MAX);
}

/** How many TPM commands may run at once in this process. */
export function tpmConcurrency(env: NodeJS.ProcessEnv = process.env): number {
  return Math.max(1, threadPoolSize(env) - FS_RESERVE);
}

/** The environment for a child process that will host TPM instances. */
export function engineEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return { ...env, UV_THREADPOOL_SIZE: env['UV_THREADPOOL_SIZE'] ?? String(ENGINE_THREADPOOL_SIZE) };
}
