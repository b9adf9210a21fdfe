// A guest's exactly-once session on one in-process vTPM (docs/engine.md "Exactly once"): ring requests
// carry u64 ids, each runs once, and its answer is released only when the answer, the id and the TPM's
// volatile state are held together at the manager (the JournalStore wraps them into one volatile blob).
// Several requests outstanding at once share one checkpoint (group commit). A store that fails (the
// manager killed) rebuilds the TPM from the last checkpoint, so running the requests again runs them
// once. The single-VM backend and every multi-VM vTPM domain serve their rings through this class.
import { setTimeout as sleep } from 'node:timers/promises';
import type { TpmInstance } from '../tpm/instance.js';
import { isFastCommand } from '../tpm/fast-path.js';
import type { Completed, OnceRequest, VtpmTarget } from '../tpm/vtpm.js';
import type { JournalStore } from './journal.js';

/** How long a command waits for an unreachable manager (killed and being restarted) before failing. */
export const STORE_RETRY_MS = 60_000;

/** A request that put the TPM in failure mode after others of its group ran: roll those back and redo. */
class Rollback extends Error {}

export class ExactlyOnce implements VtpmTarget {
  readonly inst: TpmInstance;
  readonly #journal: JournalStore;
  readonly #log: (l: string) => void;
  /** Commands run, and how many of them the last checkpoint covers: equal means clean. */
  #runs: number;
  #saved = 0;

  /** `dirty`: the instance consumed stored volatile state at power-on, so it differs from the store. */
  constructor(inst: TpmInstance, journal: JournalStore, log: (l: string) => void, dirty = true) {
    this.inst = inst;
    this.#journal = journal;
    this.#log = log;
    this.#runs = dirty ? 1 : 0;
  }

  get instance(): number {
    return this.inst.instance;
  }

  /** Nothing ran since the last checkpoint. */
  get clean(): boolean {
    return this.#saved === this.#runs;
  }

  /** saveVolatile, and note what it covers: commands run meanwhile keep the session dirty. */
  async #save(): Promise<void> {
    const runs = this.#runs;
    await this.inst.saveVolatile();
    this.#saved = runs;
  }

  #run(command: Uint8Array, locality: number): Promise<Uint8Array> {
    this.#runs++;
    return this.inst.execute(command, { locality });
  }

  /** One command without an id (v2 guests): run it; a TPM in failure mode is rebuilt first. */
  async execute(command: Uint8Array, opts: { locality: number }): Promise<Uint8Array> {
    // Only its own guest notices: the failing command already got the TPM's failure response.
    if (this.inst.status === 'failed') {
      this.#log(`vTPM instance ${this.instance} in failure mode (${this.inst.failure?.message ?? '?'}); recreating from durable state`);
      await this.inst.recreate();
    }
    return this.#run(command, opts.locality);
  }

  cancel(): void {
    this.inst.cancel();
  }

  /** Id 0 means "no id" (a command forwarded for a v2 guest): never answered from the table. */
  completed(id: bigint): Completed | undefined {
    return id === 0n ? undefined : this.#journal.get(id);
  }

  async executeGroup(
    first: OnceRequest,
    more: (joins: (command: Uint8Array) => boolean) => OnceRequest | undefined,
    statusOf: (request: OnceRequest, response: Uint8Array) => number,
  ): Promise<Uint8Array[]> {
    if (first.id === 0n) return [await this.execute(first.command, first)];
    const inst = this.inst;
    const journal = this.#journal;
    // Constant-time commands may join a group: they hold the answers before them back by µs. Any
    // other command starts a group of its own (a key generation must not delay earlier answers).
    const joins = (c: Uint8Array): boolean => isFastCommand(inst.version, c);
    const reqs: OnceRequest[] = [first];
    const out: Uint8Array[] = []; // answers of reqs[0 .. out.length), held safely
    let open = true; // may still take requests from `more`
    let stop = Infinity; // this segment ends before reqs[stop] (it put the TPM in failure mode)
    const deadline = Date.now() + STORE_RETRY_MS;
    let attempt = 0;
    // Until the responses, their ids and the volatile state are stored together, nothing is released.
    while (out.length < reqs.length || (open && out.length < stop)) {
      const start = out.length;
      const answers: Uint8Array[] = [];
      try {
        if (inst.status !== 'running') await inst.recreate();
        for (let i = start; i < stop; i++) {
          if (i === reqs.length) {
            const next = open ? more(joins) : undefined;
            if (!next) {
              open = false;
              break;
            }
            reqs.push(next);
          }
          const r = reqs[i]!;
          const done = this.completed(r.id); // a retry may find an earlier attempt's checkpoint stored
          if (done) {
            answers.push(done.response);
            continue;
          }
          const response = await this.#run(r.command, r.locality);
          if (inst.status === 'failed' && inst.failure?.reason !== 'store') {
            // Failure mode: what ran before it in this segment is not stored and the TPM is lost.
            // Redo those alone from the checkpoint, then this one alone, answered with the TPM's
            // failure response and not recorded (as a single command always was).
            if (i > start) {
              stop = i;
              throw new Rollback();
            }
            out.push(response);
            stop = Infinity;
            break;
          }
          if (inst.status !== 'running') throw new Error(`state store failed (${inst.failure?.message ?? inst.status})`);
          if (r.id !== 0n) journal.record(r.id, { status: statusOf(r, response), response });
          answers.push(response);
        }
        if (answers.length) {
          await this.#save();
          out.push(...answers);
        }
        if (out.length === stop) stop = Infinity;
        attempt = 0;
        continue;
      } catch (err) {
        if (err instanceof Rollback) continue;
        if (Date.now() > deadline) throw err;
        if (attempt === 0) this.#log(`vTPM instance ${inst.instance}: requests ${reqs[start]?.id}..: ${(err as Error).message}; retrying from the last checkpoint`);
      }
      await sleep(Math.min(200, 10 * 2 ** Math.min(attempt++, 5)));
    }
    return out;
  }

  async checkpoint(): Promise<void> {
    if (this.clean) return;
    if (this.inst.status === 'running') await this.#save();
  }
}
