// A domain process's start-up (module loading, the first attach) leaves garbage V8 would collect only
// when its young generation fills, which an idle vTPM domain may never do. When the process runs with
// --expose-gc (src/backend/domain-flags.ts), collect it once things settle, so the pages go back to the
// kernel. Without the flag this does nothing.
export function collectAfterStartup(delayMs = 200): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (typeof gc !== 'function') return;
  // Twice: the first full collection ages what the second may then release.
  setTimeout(() => {
    gc();
    setTimeout(() => gc(), 50).unref();
  }, delayMs).unref();
}
