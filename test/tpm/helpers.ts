// Shared set-up for engine tests: a temp directory store per test file, a store whose writes a test
// can hold back, and hex helpers.
import { DirStateStore } from '../../src/tpm/dir-store.js';
import type { StateKind, StateStore } from '../../src/tpm/state-store.js';
import { scratchDir } from '../helpers/temp.js';

export function tempStore(prefix: string): { store: DirStateStore; dir: string; cleanup: () => void } {
  const t = scratchDir(prefix);
  const store = new DirStateStore(t.dir);
  // The store first: its spare refills would otherwise make files again under the removal.
  return { store, dir: t.dir, cleanup: () => (store.close(), t.cleanup()) };
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b).toString('hex');
}

export function unhex(s: string): Uint8Array {
  return new Uint8Array(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
}

/**
 * A real store whose store() waits while the test holds it (and fails when told to): shows what an
 * instance releases before its state is durable. Records every store() begun (`stores`) and the order
 * of stores begun and finished (`log`, where a test may add its own events).
 */
export class GatedStore implements StateStore {
  stores: Array<{ instance: number; kind: StateKind; length: number }> = [];
  log: string[] = [];
  #gate: Promise<void> = Promise.resolve();
  #open: () => void = () => undefined;
  #fail: (e: Error) => void = () => undefined;

  constructor(readonly inner: StateStore) {}

  hold(): void {
    this.#gate = new Promise((resolve, reject) => {
      this.#open = resolve;
      this.#fail = reject;
    });
    this.#gate.catch(() => undefined);
  }

  release(): void {
    this.#open();
  }

  fail(err: Error): void {
    this.#fail(err);
  }

  load(instance: number, kind: StateKind): Promise<Uint8Array | null> {
    return this.inner.load(instance, kind);
  }

  async store(instance: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    this.stores.push({ instance, kind, length: blob.length });
    this.log.push(`store ${instance} ${kind}`);
    await this.#gate;
    await this.inner.store(instance, kind, blob);
    this.log.push(`stored ${instance} ${kind}`);
  }

  delete(instance: number, kind: StateKind): Promise<void> {
    return this.inner.delete(instance, kind);
  }
}
