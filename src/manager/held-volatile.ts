// Volatile checkpoints the manager holds in memory before they are durable (docs/manager.md
// HOLD_VOLATILE, APPEND_VOLATILE). A vTPM's volatile state (PCRs, sessions, loaded objects) must
// survive any single process crash, not power loss: once the backend and the manager both hold a
// checkpoint it may be acknowledged. The manager serves LOAD_VOLATILE from here and writes each held
// checkpoint to the store in the background, at CLOSE and at shutdown; a backend holds its latest
// checkpoints again after a manager restart. A written checkpoint stays here (clean) so later appends
// still find it, until a durable save, a delete or CLOSE replaces it. The writer is told what the store
// already holds of each checkpoint, so it can write only what was appended since (held-writer.ts).
import { Refusal } from './refusal.js';
import { Ord, Status, ordinalName } from './wire.js';

/** What the store holds of a held checkpoint: the whole blob of generation `base`, then `pieces` up to byte `end`, the last at `generation`. */
export interface Stored {
  base: number;
  generation: number;
  end: number;
  pieces: number;
}

/**
 * Stores one checkpoint durably, given what the store already holds of it (null: nothing yet); returns
 * what the store holds now, or null when it dropped it (the instance no longer takes saves).
 * `current()`: the checkpoint is still the one held (no durable save or new hold replaced it since).
 */
export type HeldWriter = (instance: number, data: Buffer, stored: Stored | null, current: () => boolean) => Promise<Stored | null>;

interface Entry {
  pieces: Buffer[];
  /** Changed since it was last written. */
  dirty: boolean;
  stored: Stored | null;
}

export class HeldVolatile {
  readonly #held = new Map<number, Entry>();
  readonly #write: HeldWriter;
  readonly #delayMs: number;
  readonly #log: (line: string) => void;
  #timer: NodeJS.Timeout | null = null;
  #flushing: Promise<void> = Promise.resolve();

  constructor(write: HeldWriter, delayMs: number, log: (line: string) => void) {
    this.#write = write;
    this.#delayMs = delayMs;
    this.#log = log;
  }

  /** The ordinals take() serves. */
  static takes(code: number): boolean {
    return code === Ord.HOLD_VOLATILE || code === Ord.APPEND_VOLATILE;
  }

  /** A client's HOLD_VOLATILE or APPEND_VOLATILE for an open instance; refused (Refusal) if it cannot be held. */
  take(code: number, instance: number, params: Uint8Array): void {
    if (params.length === 0) throw new Refusal(Status.BAD_PARAMETER, `empty ${ordinalName(code)} for instance ${instance}`);
    // A copy: the frame is a view of the FIFO's read buffer.
    if (code === Ord.HOLD_VOLATILE) this.hold(instance, Buffer.from(params));
    else if (!this.append(instance, Buffer.from(params)))
      throw new Refusal(Status.BAD_PARAMETER, `APPEND_VOLATILE on instance ${instance}: no checkpoint held to append to`);
  }

  hold(instance: number, data: Buffer): void {
    this.#held.set(instance, { pieces: [data], dirty: true, stored: null });
    this.#schedule();
  }

  /** False when nothing is held for the instance (the caller must hold a whole checkpoint first). */
  append(instance: number, bytes: Buffer): boolean {
    const e = this.#held.get(instance);
    if (!e) return false;
    e.pieces.push(bytes);
    e.dirty = true;
    this.#schedule();
    return true;
  }

  get(instance: number): Buffer | undefined {
    const e = this.#held.get(instance);
    if (!e) return undefined;
    if (e.pieces.length > 1) e.pieces = [Buffer.concat(e.pieces)];
    return e.pieces[0];
  }

  /** A newer durable save, or a delete, replaces what is held. */
  drop(instance: number): void {
    this.#held.delete(instance);
  }

  #schedule(): void {
    if (this.#timer) return;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.flush().catch((err: unknown) => this.#log(`background write of held volatile state: ${(err as Error).message}`));
    }, this.#delayMs);
  }

  /**
   * Write what is held and changed (one instance's, or all) to the store. All of a flush's writes are
   * started together, so the store's group commit makes them durable in one commit (one fdatasync for
   * every guest's checkpoint, not one each). Flushes run one at a time and each takes every instance's
   * latest state when it runs, so an older checkpoint is never written after a newer one.
   */
  flush(instance?: number): Promise<void> {
    const run = async (): Promise<void> => {
      const ids = instance === undefined ? [...this.#held.keys()] : [instance];
      const writes: Array<Promise<void>> = [];
      for (const i of ids) {
        const e = this.#held.get(i);
        if (!e?.dirty) continue;
        const data = this.get(i)!;
        e.dirty = false;
        writes.push(
          this.#write(i, data, e.stored, () => this.#held.get(i) === e).then(
            (stored) => void (e.stored = stored),
            (err: unknown) => {
              // What the store holds is uncertain now: the next write is a whole one.
              e.stored = null;
              if (this.#held.get(i) === e) e.dirty = true;
              throw err;
            },
          ),
        );
      }
      // Every write settles (and marks its instance dirty again on failure) before the first error is reported.
      const failed = (await Promise.allSettled(writes)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    };
    const p = this.#flushing.then(run);
    this.#flushing = p.catch(() => undefined);
    return p;
  }

  stop(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
  }
}
