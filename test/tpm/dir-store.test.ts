// DirStateStore: what store() resolves is what load() returns; a failed or interrupted store leaves
// the old blob (or the new one) whole, never a torn one, and no temp file behind.
import { spawn } from 'node:child_process';
import { mkdirSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { DirStateStore } from '../../src/tpm/dir-store.js';
import { hex, tempDir } from './helpers.js';

const here = dirname(fileURLToPath(import.meta.url));

describe('DirStateStore', () => {
  const cleanups: Array<() => void> = [];
  afterAll(() => {
    for (const c of cleanups) c();
  });
  const dir = (): string => {
    const t = tempDir('dirstore');
    cleanups.push(t.cleanup);
    return t.dir;
  };

  it('stores, overwrites, loads and deletes; files are 0600 and no temp file stays', async () => {
    const store = new DirStateStore(dir());
    expect(await store.load(3, 'permanent')).toBeNull();
    await store.store(3, 'permanent', Uint8Array.of(1, 2, 3));
    await store.store(3, 'volatile', new Uint8Array(0));
    await store.store(3, 'permanent', Uint8Array.of(4, 5));
    expect(hex((await store.load(3, 'permanent'))!)).toBe('0405');
    expect((await store.load(3, 'volatile'))!.length).toBe(0);
    expect(readdirSync(store.dir).sort()).toEqual(['tpm-3.permanent', 'tpm-3.volatile']);
    expect(statSync(store.path(3, 'permanent')).mode & 0o777).toBe(0o600);
    await store.delete(3, 'volatile');
    await store.delete(3, 'savestate'); // missing: not an error
    expect(readdirSync(store.dir)).toEqual(['tpm-3.permanent']);
    store.close();
    await store.store(3, 'savestate', Uint8Array.of(9)); // reopens the directory fd
    expect(hex((await store.load(3, 'savestate'))!)).toBe('09');
    store.close();
  });

  it('a failed rename rejects, keeps nothing half-written and removes its temp file', async () => {
    const store = new DirStateStore(dir());
    // A non-empty directory where the blob should go: rename(2) fails with EISDIR/ENOTEMPTY.
    mkdirSync(join(store.path(4, 'permanent'), 'x'), { recursive: true });
    await expect(store.store(4, 'permanent', Uint8Array.of(1))).rejects.toMatchObject({ code: expect.stringMatching(/EISDIR|ENOTEMPTY|EEXIST/) });
    expect(readdirSync(store.dir)).toEqual(['tpm-4.permanent']);
    expect(await store.load(5, 'permanent')).toBeNull();
    store.close();
  });

  it('a writer killed at any moment leaves the old or the new blob, whole', async () => {
    const d = dir();
    const store = new DirStateStore(d);
    for (let round = 0; round < 6; round++) {
      const child = spawn(process.execPath, [join(here, 'dir-store-child.mjs'), d], { stdio: ['ignore', 'pipe', 'inherit'] });
      await new Promise<void>((resolve, reject) => {
        child.stdout.once('data', () => resolve());
        child.once('exit', (c) => reject(new Error(`writer exited with ${c}`)));
      });
      // Let it overwrite for a while (a different moment each round), then kill it mid-stream.
      await new Promise((r) => setTimeout(r, 3 + round * 7));
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;
      const blob = (await store.load(1, 'permanent'))!;
      expect(blob.length).toBe(65536);
      expect(new Set(blob).size).toBe(1);
      expect([0xaa, 0xbb]).toContain(blob[0]);
    }
    // Killed writers may leave temp files (never read); the blob itself is never one of them.
    expect(readdirSync(d).filter((f) => !f.includes('.tmp-'))).toEqual(['tpm-1.permanent']);
  });
});
