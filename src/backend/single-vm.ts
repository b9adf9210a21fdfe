// Single-VM mode: every guest's vTPM is a libtpms instance inside the backend process, its state kept
// at the manager (the ManagerClient is the instances' StateStore, so NV writes are durable there before
// a response is released).
import type { TpmHost } from '../tpm/host.js';
import type { TpmInstance } from '../tpm/instance.js';
import type { ManagerClient } from '../manager/client.js';
import type { VtpmProvider } from './device.js';
import type { VtpmTarget } from './target.js';
import type { QemuVtpm } from './qemu-endpoint.js';
import type { QemuVtpmProvider } from './qemu-devices.js';
import { JournalStore } from './journal.js';
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

export class InProcessVtpms implements VtpmProvider, QemuVtpmProvider {
  readonly #host: TpmHost;
  readonly #mgr: ManagerClient;
  readonly #log: (l: string) => void;
  readonly #journals = new Map<number, JournalStore>();

  constructor(host: TpmHost, mgr: ManagerClient, log: (l: string) => void) {
    this.#host = host;
    this.#mgr = mgr;
    this.#log = log;
  }

  async open(vmUuid: string, version: '2.0' | '1.2', resume: boolean): Promise<VtpmTarget & { instance: number }> {
    // A manager being restarted (killed, crashed) is unreachable for a moment: wait for it.
    const { instance, created } = await whileManagerDown(() => this.#mgr.open({ vmUuid, version }), this.#log);
    let inst = this.#host.get(instance);
    if (!inst || inst.status === 'destroyed') {
      // A fresh attach boots the vTPM (the guest sends Startup); only a resume keeps volatile state.
      if (!resume && !created) await whileManagerDown(() => this.#mgr.delete(instance, 'volatile'), this.#log);
      const journal = new JournalStore(this.#mgr, instance);
      this.#journals.set(instance, journal);
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
    const inst = await this.#host.create({ instance, version, store: this.#mgr, powerOn: false });
    this.#log(`vTPM instance ${instance} (${version}) ${created ? 'created' : 'loaded'} for QEMU VM ${vmUuid}`);
    return inst;
  }

  #target(inst: TpmInstance): VtpmTarget & { instance: number } {
    const log = this.#log;
    const journal = this.#journals.get(inst.instance);
    return {
      instance: inst.instance,
      async execute(command, opts) {
        // An instance that fell into libtpms failure mode is rebuilt from its last durable state; only
        // its own guest notices (the failing command already got the TPM's failure response).
        if (inst.status === 'failed') {
          log(`vTPM instance ${inst.instance} in failure mode (${inst.failure?.message ?? '?'}); recreating from durable state`);
          await inst.recreate();
        }
        return inst.execute(command, opts);
      },
      cancel: () => inst.cancel(),
      completed: (id) => journal?.get(id),
      async executeOnce(id, command, opts, statusOf) {
        if (!journal) throw new Error(`vTPM instance ${inst.instance} has no exactly-once table`);
        // Until the response, its id and the volatile state are durable together, nothing is released.
        // A store that fails (manager killed) leaves the instance failed; rebuilding it from the last
        // checkpoint rolls the TPM back to before this command, so running it again runs it once.
        const deadline = Date.now() + STORE_RETRY_MS;
        for (let attempt = 0; ; attempt++) {
          try {
            if (inst.status !== 'running') await inst.recreate();
            const done = journal.get(id); // a retry may find the first attempt's checkpoint durable
            if (done) return done.response;
            const response = await inst.execute(command, opts);
            if (inst.status === 'failed' && inst.failure?.reason !== 'store') return response;
            if (inst.status === 'running') {
              journal.record(id, { status: statusOf(response), response });
              await inst.saveVolatile();
              return response;
            }
          } catch (err) {
            if (Date.now() > deadline) throw err;
            if (attempt === 0) log(`vTPM instance ${inst.instance}: request ${id}: ${(err as Error).message}; retrying from the last checkpoint`);
          }
          await sleep(Math.min(200, 10 * 2 ** Math.min(attempt, 5)));
        }
      },
      checkpoint: async () => {
        if (inst.status === 'running') await inst.saveVolatile();
      },
    };
  }

  async release(instance: number): Promise<void> {
    const inst = this.#host.get(instance);
    if (inst && inst.status === 'running') await inst.saveVolatile().catch((e: unknown) => this.#log(`save volatile of ${instance}: ${(e as Error).message}`));
    await this.#host.destroy(instance);
    this.#journals.delete(instance);
    await this.#mgr.close(instance).catch((e: unknown) => this.#log(`manager CLOSE ${instance}: ${(e as Error).message}`));
  }
}
