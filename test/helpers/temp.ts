// The one temp-directory helper for every test: `vtpm-<tag>-XXXXXX` under the OS temp directory (or a
// base a test needs: /dev/shm for hypervisor directories, /var/tmp where a sandbox hides /tmp).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';

/** A fresh, empty directory named after the test that owns it. */
export function tempDir(tag: string, base: string = os.tmpdir()): string {
  return mkdtempSync(join(base, `vtpm-${tag}-`));
}

/** Removes a test's directory. Retries: a store's spare refill may still be adding a file when a test ends. */
export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
}

/** A fresh directory with its remover, for tests that collect cleanups. */
export function scratchDir(tag: string, base?: string): { dir: string; cleanup: () => void } {
  const dir = tempDir(tag, base);
  return { dir, cleanup: () => removeDir(dir) };
}
