// A guest's exactly-once session on one in-process vTPM (docs/engine.md "Exactly once"): ring requests
// carry u64 ids, each runs once, and its answer is released only when the answer, the id and the TPM's
// volatile state are held together by this process and the manager (the JournalStore wraps them into one
// volatile blob, HOLD_VOLATILE puts it in the manager's memory; docs/suspend-and-stress.md says what
// survives what). NV writes stay durable before any answer; suspend and release make the checkpoint durable.
// Several requests outstanding at once share one checkpoint (group commit). A store that fails (the
// manager killed) rebuilds the TPM from the last checkpoint, so running the requests again runs them
// once. The single-VM backend and every multi-VM vTPM domain serve their rings through this class.
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TpmInstance } from '../tpm/instance.js';
import { isFastCommand } from '../tpm/fast-path.js';
import { stirRandom, volatileEffect, type VolatileEffect } from '../tpm/volatile-effect.js';
import type { Completed, OnceRequest, VtpmTarget } from '../tpm/vtpm.js';
import type { JournalStore, ReplayRecord } from './journal.js';

/** How long a command waits for an unreachable manager (killed and being restarted) before failing. */
export const STORE_RETRY_MS = 60_000;

type More = (joins: (command: Uint8Array) => boolean) => OnceRequest | undefined;
type StatusOf = (request: OnceRequest, response: Uint8Array) => number;

/** A request that put the TPM in failure mode after others of its group ran: roll those back and redo. */
class Rollback extends Error {}

export class ExactlyOnce implements VtpmTarget {
  readonly inst: TpmInstance;
  readonly #journal: JournalStore;
  readonly #log: (l: string) => void;
  /** Commands run, and how many of them the last checkpoint covers: equal means clean. */
  #runs: number;
  #saved = 0;
  /** Ids run and recorded whose checkpoint is not held yet: not answered from the table until it is. */
  readonly #unheld = new Set<bigint>();
  /** Groups run one at a time, also across channels (a guest that reconnects while one is running): */
  #busy = false;
  /** the groups waiting, in arrival order (no promise is made for a group that finds none running). */
  readonly #waiting: Array<() => void> = [];

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

  /** Nothing ran since the last checkpoint, and that checkpoint is durable (not only held). */
  get clean(): boolean {
    return this.#saved === this.#runs && this.#journal.volatileDurable;
  }

  /**
   * saveVolatile, and note what it covers: commands run meanwhile keep the session dirty. `hold`: the
   * checkpoint is acknowledged once the manager holds it in memory (two processes hold it then).
   */
  async #save(hold: boolean): Promise<void> {
    const runs = this.#runs;
    await (hold ? this.#journal.holding(() => this.inst.saveVolatile()) : this.inst.saveVolatile());
    this.#saved = runs;
  }

  /** `changes`: false for a read (effect 'none'), which leaves the last checkpoint covering the state. */
  #run(command: Uint8Array, locality: number, changes = true): Promise<Uint8Array> {
    if (changes) this.#runs++;
    return this.inst.execute(command, { locality });
  }

  /** #run without the instance queue's promises when it can take the command at once (`executeNow`). */
  #runNow(command: Uint8Array, locality: number, changes: boolean): Uint8Array | Promise<Uint8Array> {
    const now = this.inst.executeNow(command, locality);
    if (now === null) return this.#run(command, locality, changes);
    if (changes) this.#runs++;
    return now;
  }

  /**
   * After the TPM powered on from a checkpoint: run the checkpoint's replay records again (their ids
   * answered from the table from then on), and stir the DRBG with fresh entropy so that no random
   * answer given after the checkpoint is given again. Call before the session serves anything.
   */
  async restore(): Promise<void> {
    for (const r of this.#journal.takeReplay()) {
      await this.inst.execute(r.command, { locality: r.locality });
      this.#journal.record(r.id, { status: r.status, response: r.response });
    }
    if (this.#journal.loadedVolatile) await this.inst.execute(stirRandom(this.inst.version, randomBytes(32)), { locality: 0 });
    // Left dirty on purpose: what was loaded may be held only in memory (or consumed at power-on when
    // no ids completed), so the next suspend or release writes it durably again.
  }

  async #recreate(): Promise<void> {
    await this.inst.recreate();
    await this.restore();
  }

  /** One command without an id (v2 guests): run it; a TPM in failure mode is rebuilt first. */
  async execute(command: Uint8Array, opts: { locality: number }): Promise<Uint8Array> {
    // Only its own guest notices: the failing command already got the TPM's failure response.
    if (this.inst.status === 'failed') {
      this.#log(`vTPM instance ${this.instance} in failure mode (${this.inst.failure?.message ?? '?'}); recreating from durable state`);
      await this.#recreate();
    }
    return this.#run(command, opts.locality);
  }

  cancel(): void {
    this.inst.cancel();
  }

  /** Id 0 means "no id" (a command forwarded for a v2 guest): never answered from the table. */
  completed(id: bigint): Completed | undefined {
    if (id === 0n) return undefined;
    const c = this.#journal.get(id); // mostly a new id: no table entry, and no #unheld lookup either
    return c === undefined || this.#unheld.has(id) ? undefined : c;
  }

  executeGroup(first: OnceRequest, more: More, statusOf: StatusOf): Promise<Uint8Array[]> {
    if (this.#busy) return this.#afterWaiting(first, more, statusOf);
    this.#busy = true;
    let run: Promise<Uint8Array[]>;
    try {
      run = this.#groupNow(first, more, statusOf);
    } catch (err) {
      run = Promise.reject(err);
    }
    return run.then(
      (out) => {
        this.#release();
        return out;
      },
      (err: unknown) => {
        this.#release();
        throw err;
      },
    );
  }

  async #afterWaiting(first: OnceRequest, more: More, statusOf: StatusOf): Promise<Uint8Array[]> {
    await new Promise<void>((r) => this.#waiting.push(r)); // handed over still busy
    try {
      return await this.#groupNow(first, more, statusOf);
    } finally {
      this.#release();
    }
  }

  #release(): void {
    this.#unheld.clear();
    // Handed straight to the next group (still busy), so none can overtake it meanwhile.
    const next = this.#waiting.shift();
    if (next) next();
    else this.#busy = false;
  }

  /** The effect of a command the instance runs at once whose effect `n` appended records (or none) cover; else null. */
  #effectNow(command: Uint8Array, n: number): VolatileEffect | null {
    if (!this.inst.canRunNow(command)) return null;
    const effect = volatileEffect(this.inst.version, command);
    return effect === 'none' || (effect === 'replay' && this.#journal.canAppend(n + 1)) ? effect : null;
  }

  /**
   * The common group without an async frame or the instance queue: every request a fast command the
   * instance runs at once, deterministic (its replay records appended to the held checkpoint) or a
   * read. Anything else goes to #group; so does a group whose run turns out unusual (an NV write, the
   * TPM failing, the append refused): it then holds a full checkpoint of what ran, or rebuilds the TPM.
   */
  #groupNow(first: OnceRequest, more: More, statusOf: StatusOf): Promise<Uint8Array[]> {
    const firstEffect = first.id === 0n || this.#journal.get(first.id) ? null : this.#effectNow(first.command, 0);
    if (firstEffect === null) return this.#group(first, more, statusOf);
    const inst = this.inst;
    const journal = this.#journal;
    const reqs: OnceRequest[] = [];
    const answers: Uint8Array[] = [];
    const records: ReplayRecord[] = [];
    let effect: VolatileEffect | null = firstEffect; // of the request `more` hands over next
    const joins = (c: Uint8Array): boolean => isFastCommand(inst.version, c) && (effect = this.#effectNow(c, records.length)) !== null;
    // Those taken so far first, then the channel's queue: #group answers what ran from the table.
    const slow = (): Promise<Uint8Array[]> => {
      let i = 1;
      return this.#group(reqs[0]!, (j) => (i < reqs.length ? reqs[i++] : more(j)), statusOf, true);
    };
    for (let r: OnceRequest | undefined = first; r; r = more(joins)) {
      reqs.push(r);
      if (r.id === 0n) return slow(); // not recorded, so a full checkpoint (#group runs it)
      const done = journal.get(r.id); // ran in an earlier group, which holds it
      if (done) {
        answers.push(done.response);
        continue;
      }
      const ran = effect === null ? null : inst.executeNow(r.command, r.locality);
      if (ran === null) return reqs.length === 1 ? this.#group(first, more, statusOf) : slow();
      if (effect !== 'none') this.#runs++;
      if (!(ran instanceof Uint8Array)) {
        // It wrote NV: once that is durable, record it and hold a full checkpoint; a failed write
        // failed the TPM, which #group rebuilds from the last checkpoint.
        const r0 = r;
        return ran.then(
          (response) => {
            if (inst.status === 'running') this.#record(r0, statusOf(r0, response), response);
            return slow();
          },
          () => slow(),
        );
      }
      if (inst.status !== 'running') return slow(); // rebuilt from the checkpoint, then run again
      const status = statusOf(r, ran);
      this.#record(r, status, ran);
      if (effect === 'replay') records.push({ id: r.id, locality: r.locality, status, command: r.command, response: ran });
      answers.push(ran);
    }
    const settled = (): Uint8Array[] | Promise<Uint8Array[]> => {
      const settling = journal.settled();
      return settling ? settling.then(() => answers) : answers;
    };
    if (records.length === 0) return Promise.resolve(settled());
    const runs = this.#runs;
    return journal.append(records).then(
      () => {
        this.#saved = runs;
        return settled();
      },
      (err: unknown) => {
        this.#log(`vTPM instance ${inst.instance}: requests ${first.id}..: ${(err as Error).message}; holding a full checkpoint`);
        return slow();
      },
    );
  }

  /** Ran and in the table; not answered from it until its checkpoint is held. */
  #record(r: OnceRequest, status: number, response: Uint8Array): void {
    this.#journal.record(r.id, { status, response });
    this.#unheld.add(r.id);
  }

  async #group(first: OnceRequest, more: More, statusOf: StatusOf, mustHoldFirst = false): Promise<Uint8Array[]> {
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
    // A checkpoint failed while the TPM kept running (an append refused, the manager gone): what ran
    // is only in this process, so the next attempt holds a full copy even if it runs nothing new.
    let mustHold = mustHoldFirst;
    // Until the responses, their ids and the volatile state are stored together, nothing is released.
    while (out.length < reqs.length || (open && out.length < stop)) {
      const start = out.length;
      const answers: Uint8Array[] = [];
      // What this segment did to volatile state: nothing, deterministic commands to log, or more.
      let full = false;
      const records: ReplayRecord[] = [];
      try {
        if (inst.status !== 'running') await this.#recreate();
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
          // An earlier group's, or (held or not) this group's earlier attempt's: the TPM ran it already.
          const done = r.id === 0n ? undefined : journal.get(r.id);
          if (done) {
            answers.push(done.response);
            continue;
          }
          // A read changes nothing a restore must bring back (volatile-effect.ts): the session stays
          // clean, so a suspend after only reads stores nothing.
          const effect = volatileEffect(inst.version, r.command);
          const ran = this.#runNow(r.command, r.locality, effect !== 'none' || r.id === 0n);
          const response = ran instanceof Uint8Array ? ran : await ran;
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
          const status = statusOf(r, response);
          if (r.id !== 0n) this.#record(r, status, response);
          if (effect === 'full' || r.id === 0n) full = true;
          else if (effect === 'replay') records.push({ id: r.id, locality: r.locality, status, command: r.command, response });
          answers.push(response);
        }
        if (answers.length) {
          // Reads need no checkpoint; deterministic commands are appended to the held one; anything
          // else holds a new full copy of the volatile state.
          if (full || mustHold || (records.length > 0 && !journal.canAppend(records.length))) await this.#save(true);
          else if (records.length > 0) {
            const runs = this.#runs;
            await journal.append(records);
            this.#saved = runs;
          }
          out.push(...answers);
        }
        if (out.length === stop) stop = Infinity;
        attempt = 0;
        mustHold = false;
        continue;
      } catch (err) {
        if (err instanceof Rollback) continue;
        mustHold = true;
        if (Date.now() > deadline) throw err;
        if (attempt === 0) this.#log(`vTPM instance ${inst.instance}: requests ${reqs[start]?.id}..: ${(err as Error).message}; retrying from the last checkpoint`);
      }
      await sleep(Math.min(200, 10 * 2 ** Math.min(attempt++, 5)));
    }
    // A manager restarted meanwhile must hold our checkpoints again before anything is answered, even
    // answers that needed no checkpoint: until then acknowledged state would be in this process alone.
    const settling = journal.settled();
    if (settling) await settling;
    return out;
  }

  /** Durable at suspend: a held checkpoint is written again as a durable one. */
  async checkpoint(): Promise<void> {
    if (this.clean) return;
    if (this.inst.status === 'running') await this.#save(false);
  }
}
