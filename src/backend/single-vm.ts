// Single-VM mode: every guest's vTPM is a libtpms instance inside the backend process, its state kept
// at the manager (the ManagerClient is the instances' StateStore, so NV writes are durable there before
// a response is released).
import type { TpmHost } from '../tpm/host.js';
import type { TpmInstance } from '../tpm/instance.js';
import type { ManagerClient } from '../manager/client.js';
import type { VtpmProvider } from './device.js';
import type { OnceRequest, VtpmTarget } from './target.js';
import type { QemuVtpm } from './qemu-endpoint.js';
import type { QemuVtpmProvider } from './qemu-devices.js';
import { JournalStore } from './journal.js';
import { isFastCommand } from '../tpm/fast-path.js';
import { setTimeout as sleep } from 'node:timers/promises';

/** How long a command waits for an unreachable manager (killed and being restarted) before failing. */
const STORE_RETRY_MS = 60_000;

async function whileManagerDown<T>(op: () => Promise<T>, log: (l: string) => void): Promise<T> {
  const deadline = Date.now() + STORE_RETRY_MS;
  for (let attempt = 0; ; attempt++) {
    try {
      return await op();
    } catch (err) {
      const m = (err as Error).message;
      if (Date.now() > deadline || !/ENXIO|ENOENT|EPIPE|DISCONNECTED|no manager|closed our/.test(m)) throw err;
      if (attempt === 0) log(`manager unreachable (${m}); retrying`);
      await sleep(Math.min(200, 10 * 2 ** Math.min(attempt, 5)));
    }
  }
}

/** What the backend keeps per loaded guest vTPM beside the instance. */
interface Loaded {
  journal: JournalStore;
  /** Commands run, and how many of them the last durable checkpoint covers: equal means clean. */
  runs: number;
  saved: number;
}

/** A request that put the TPM in failure mode after others of its group ran: roll those back and redo. */
class Rollback extends Error {}

/** A vTPM dom0 opened at the manager for a stub domain (docs/multi-vm.md, stubdom): the one this provider serves. */
export interface OpenedVtpm {
  instance: number;
  created: boolean;
  vm: string;
}

export class StubdomVtpmError extends Error {
  readonly code = 'OTHER_VM';
}

export class InProcessVtpms implements VtpmProvider, QemuVtpmProvider {
  readonly #host: TpmHost;
  readonly #mgr: ManagerClient;
  readonly #log: (l: string) => void;
  readonly #loaded = new Map<number, Loaded>();
  /** Set in a stub domain: OPEN and CLOSE are dom0's (console ordinals); this is the one vTPM served. */
  readonly #opened: OpenedVtpm | undefined;

  constructor(host: TpmHost, mgr: ManagerClient, log: (l: string) => void, opened?: OpenedVtpm) {
    this.#host = host;
    this.#mgr = mgr;
    this.#log = log;
    this.#opened = opened;
  }

  async open(vmUuid: string, version: '2.0' | '1.2', resume: boolean): Promise<VtpmTarget & { instance: number }> {
    const o = this.#opened;
    if (o && vmUuid.toLowerCase() !== o.vm) throw new StubdomVtpmError(`this vTPM domain holds the vTPM of VM ${o.vm}, not ${vmUuid}`);
    // A manager being restarted (killed, crashed) is unreachable for a moment: wait for it.
    const { instance, created } = o ?? (await whileManagerDown(() => this.#mgr.open({ vmUuid, version }), this.#log));
    let inst = this.#host.get(instance);
    if (!inst || inst.status === 'destroyed') {
      // A fresh attach boots the vTPM (the guest sends Startup); only a resume keeps volatile state.
      if (!resume && !created) await whileManagerDown(() => this.#mgr.delete(instance, 'volatile'), this.#log);
      const journal = new JournalStore(this.#mgr, instance);
      // Dirty from the start: power-on consumed the stored volatile state.
      this.#loaded.set(instance, { journal, runs: 1, saved: 0 });
      // inline 'fast': GetRandom/PCR_Extend/PCR_Read and the like spend a few µs in libtpms, less than
      // the thread-pool hand-off would cost, so they run on this thread; everything that can take long
      // (key generation, asymmetric crypto) still goes to the pool and never stalls another guest.
      inst = await whileManagerDown(() => this.#host.create({ instance, version, store: journal, inline: 'fast' }), this.#log);
      this.#log(`vTPM instance ${instance} (${version}) ${created ? 'created' : resume ? 'resumed' : 'loaded'} for VM ${vmUuid}`);
    }
    return this.#target(inst);
  }

  /** The VM's instance for a QEMU endpoint: powered off until QEMU's CMD_INIT, as swtpm starts. */
  async openQemu(vmUuid: string, version: '2.0' | '1.2'): Promise<QemuVtpm> {
    const { instance, created } = await this.#mgr.open({ vmUuid, version });
    const existing = this.#host.get(instance);
    if (existing && existing.status !== 'destroyed') throw new Error(`VM ${vmUuid}: vTPM ${instance} is already attached`);
    // A QEMU cold boot starts the TPM afresh; an incoming migration brings its own volatile state.
    if (!created) await this.#mgr.delete(instance, 'volatile');
    // inline 'fast' as for ring guests: QEMU's GetRandom/PCR_Extend cost less in libtpms than a pool hop.
    const inst = await this.#host.create({ instance, version, store: this.#mgr, powerOn: false, inline: 'fast' });
    this.#log(`vTPM instance ${instance} (${version}) ${created ? 'created' : 'loaded'} for QEMU VM ${vmUuid}`);
    return inst;
  }

  #target(inst: TpmInstance): VtpmTarget & { instance: number } {
    const log = this.#log;
    const loaded = this.#loaded.get(inst.instance);
    /** saveVolatile, and note what it covers: commands run meanwhile keep the instance dirty. */
    const save = async (): Promise<void> => {
      const runs = loaded?.runs ?? 0;
      await inst.saveVolatile();
      if (loaded) loaded.saved = runs;
    };
    const run = (command: Uint8Array, opts: { locality: number }): Promise<Uint8Array> => {
      if (loaded) loaded.runs++;
      return inst.execute(command, opts);
    };
    return {
      instance: inst.instance,
      async execute(command, opts) {
        // An instance that fell into libtpms failure mode is rebuilt from its last durable state; only
        // its own guest notices (the failing command already got the TPM's failure response).
        if (inst.status === 'failed') {
          log(`vTPM instance ${inst.instance} in failure mode (${inst.failure?.message ?? '?'}); recreating from durable state`);
          await inst.recreate();
        }
        return run(command, opts);
      },
      cancel: () => inst.cancel(),
      completed: (id) => loaded?.journal.get(id),
      executeGroup: async (first, more, statusOf) => {
        if (!loaded) throw new Error(`vTPM instance ${inst.instance} has no exactly-once table`);
        const journal = loaded.journal;
        // Constant-time commands may join a group: they hold the answers before them back by µs. Any
        // other command starts a group of its own (a key generation must not delay earlier answers).
        const joins = (c: Uint8Array): boolean => isFastCommand(inst.version, c);
        const reqs: OnceRequest[] = [first];
        const out: Uint8Array[] = []; // answers of reqs[0 .. out.length), durable
        let open = true; // may still take requests from `more`
        let stop = Infinity; // this segment ends before reqs[stop] (it put the TPM in failure mode)
        const deadline = Date.now() + STORE_RETRY_MS;
        let attempt = 0;
        // Until the responses, their ids and the volatile state are durable together, nothing is
        // released. A store that fails (manager killed) leaves the instance failed; rebuilding it from
        // the last checkpoint rolls the TPM back to before the segment, so running it again runs it once.
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
              const done = journal.get(r.id); // a retry may find an earlier attempt's checkpoint durable
              if (done) {
                answers.push(done.response);
                continue;
              }
              const response = await run(r.command, { locality: r.locality });
              if (inst.status === 'failed' && inst.failure?.reason !== 'store') {
                // Failure mode: what ran before it in this segment is not durable and the TPM is lost.
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
              journal.record(r.id, { status: statusOf(r, response), response });
              answers.push(response);
            }
            if (answers.length) {
              await save();
              out.push(...answers);
            }
            if (out.length === stop) stop = Infinity;
            attempt = 0;
            continue;
          } catch (err) {
            if (err instanceof Rollback) continue;
            if (Date.now() > deadline) throw err;
            if (attempt === 0) log(`vTPM instance ${inst.instance}: requests ${reqs[start]?.id}..: ${(err as Error).message}; retrying from the last checkpoint`);
          }
          await sleep(Math.min(200, 10 * 2 ** Math.min(attempt++, 5)));
        }
        return out;
      },
      checkpoint: async () => {
        if (loaded && loaded.saved === loaded.runs) return;
        if (inst.status === 'running') await save();
      },
    };
  }

  async release(instance: number): Promise<void> {
    const inst = this.#host.get(instance);
    const loaded = this.#loaded.get(instance);
    const clean = loaded !== undefined && loaded.saved === loaded.runs;
    if (inst && inst.status === 'running' && !clean) await inst.saveVolatile().catch((e: unknown) => this.#log(`save volatile of ${instance}: ${(e as Error).message}`));
    await this.#host.destroy(instance);
    this.#loaded.delete(instance);
    if (this.#opened) return;
    await this.#mgr.close(instance).catch((e: unknown) => this.#log(`manager CLOSE ${instance}: ${(e as Error).message}`));
  }
}
