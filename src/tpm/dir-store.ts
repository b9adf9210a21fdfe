// A directory-backed StateStore, for tests and standalone use (the manager supplies the production one).
// One file per (instance, kind): <dir>/tpm-<instance>.<kind>. A store writes a temp file, fsyncs it,
// renames it over the old one and fsyncs the directory, so after store() resolves either the old or
// the new blob survives a crash, never a torn one.
import { promises as fsp, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { STATE_KINDS, type StateKind, type StateStore } from './state-store.js';

export class DirStateStore implements StateStore {
  #seq = 0;

  constructor(readonly dir: string) {}

  static async open(dir: string): Promise<DirStateStore> {
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    return new DirStateStore(dir);
  }

  path(instance: number, kind: StateKind): string {
    if (!Number.isInteger(instance) || instance < 0) throw new RangeError(`bad instance number ${instance}`);
    if (!STATE_KINDS.includes(kind)) throw new RangeError(`bad state kind ${String(kind)}`);
    return join(this.dir, `tpm-${instance}.${kind}`);
  }

  async load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    try {
      return new Uint8Array(await fsp.readFile(this.path(instance, kind)));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    const final = this.path(instance, kind);
    const tmp = `${final}.tmp-${process.pid}-${++this.#seq}`;
    const fh = await fsp.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    try {
      await fh.writeFile(blob);
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      await fsp.rename(tmp, final);
    } catch (err) {
      await fsp.rm(tmp, { force: true });
      throw err;
    }
    await this.#syncDir();
  }

  async delete(instance: number, kind: StateKind): Promise<void> {
    try {
      await fsp.unlink(this.path(instance, kind));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    await this.#syncDir();
  }

  async #syncDir(): Promise<void> {
    const dh = await fsp.open(this.dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  }
}
