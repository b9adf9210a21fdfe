// Single-VM mode: every guest's vTPM is a libtpms instance inside the backend process, its state kept
// at the manager (the ManagerClient is the instances' StateStore, so NV writes are durable there before
// a response is released). A guest device's session is the instance's ExactlyOnce; a QEMU endpoint
// drives the instance itself.
import type { TpmHost } from '../tpm/host.js';
import type { ManagerClient } from '../manager/client.js';
import type { SwtpmVtpm } from '../tpm/vtpm.js';
import type { TpmVersion } from '../tpm/wire.js';
import { ProviderError, type OpenMode, type VtpmProvider, type VtpmSession } from './provider.js';
import { JournalStore } from './journal.js';
import { ExactlyOnce, STORE_RETRY_MS } from './exactly-once.js';
import { setTimeout as sleep } from 'node:timers/promises';

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

/** A vTPM dom0 opened at the manager for a stub domain (docs/multi-vm.md, stubdom): the one this provider serves. */
export interface OpenedVtpm {
  instance: number;
  created: boolean;
}

export class InProcessVtpms implements VtpmProvider {
  readonly #host: TpmHost;
  readonly #mgr: ManagerClient;
  readonly #log: (l: string) => void;
  /** The exactly-once session of every instance opened for a guest device. */
  readonly #sessions = new Map<number, ExactlyOnce>();
  /** Set in a stub domain: OPEN and CLOSE are dom0's (console ordinals); this is the one vTPM served. */
  readonly #opened: OpenedVtpm | undefined;

  constructor(host: TpmHost, mgr: ManagerClient, log: (l: string) => void, opened?: OpenedVtpm) {
    this.#host = host;
    this.#mgr = mgr;
    this.#log = log;
    this.#opened = opened;
  }

  open(vmUuid: string, version: TpmVersion, mode: { resume: boolean }): Promise<VtpmSession>;
  open(vmUuid: string, version: TpmVersion, mode: { qemu: true }): Promise<SwtpmVtpm>;
  async open(vmUuid: string, version: TpmVersion, mode: OpenMode): Promise<VtpmSession | SwtpmVtpm> {
    return 'qemu' in mode ? this.#openQemu(vmUuid, version) : this.#openGuest(vmUuid, version, mode.resume);
  }

  async #openGuest(vmUuid: string, version: TpmVersion, resume: boolean): Promise<VtpmSession> {
    // A manager being restarted (killed, crashed) is unreachable for a moment: wait for it.
    const { instance, created } = this.#opened ?? (await whileManagerDown(() => this.#mgr.open({ vmUuid, version }), this.#log));
    const inst = this.#host.get(instance);
    const session = this.#sessions.get(instance);
    if (inst && inst.status !== 'destroyed' && session?.inst === inst) return session;
    if (inst && inst.status !== 'destroyed') throw new ProviderError('ALREADY_ATTACHED', `VM ${vmUuid}: vTPM ${instance} is attached to a QEMU endpoint`);
    // A fresh attach boots the vTPM (the guest sends Startup); only a resume keeps volatile state.
    if (!resume && !created) await whileManagerDown(() => this.#mgr.delete(instance, 'volatile'), this.#log);
    const journal = new JournalStore(this.#mgr, instance);
    // inline 'fast': GetRandom/PCR_Extend/PCR_Read and the like spend a few µs in libtpms, less than
    // the thread-pool hand-off would cost, so they run on this thread; everything that can take long
    // (key generation, asymmetric crypto) still goes to the pool and never stalls another guest.
    const loaded = await whileManagerDown(() => this.#host.create({ instance, version, store: journal, inline: 'fast' }), this.#log);
    // Dirty from the start: power-on consumed the stored volatile state.
    const s = new ExactlyOnce(loaded, journal, this.#log);
    await s.restore();
    this.#sessions.set(instance, s);
    this.#log(`vTPM instance ${instance} (${version}) ${created ? 'created' : resume ? 'resumed' : 'loaded'} for VM ${vmUuid}`);
    return s;
  }

  /** The VM's instance for a QEMU endpoint: powered off until QEMU's CMD_INIT, as swtpm starts. */
  async #openQemu(vmUuid: string, version: TpmVersion): Promise<SwtpmVtpm> {
    const { instance, created } = await this.#mgr.open({ vmUuid, version });
    const existing = this.#host.get(instance);
    if (existing && existing.status !== 'destroyed') throw new ProviderError('ALREADY_ATTACHED', `VM ${vmUuid}: vTPM ${instance} is already attached`);
    // A QEMU cold boot starts the TPM afresh; an incoming migration brings its own volatile state.
    if (!created) await this.#mgr.delete(instance, 'volatile');
    // inline 'fast' as for ring guests: QEMU's GetRandom/PCR_Extend cost less in libtpms than a pool hop.
    const inst = await this.#host.create({ instance, version, store: this.#mgr, powerOn: false, inline: 'fast' });
    this.#log(`vTPM instance ${instance} (${version}) ${created ? 'created' : 'loaded'} for QEMU VM ${vmUuid}`);
    return inst;
  }

  async release(instance: number): Promise<void> {
    const inst = this.#host.get(instance);
    const session = this.#sessions.get(instance);
    const clean = session !== undefined && session.clean;
    if (inst && inst.status === 'running' && !clean) await inst.saveVolatile().catch((e: unknown) => this.#log(`save volatile of ${instance}: ${(e as Error).message}`));
    await this.#host.destroy(instance);
    this.#sessions.delete(instance);
    if (this.#opened) return;
    await this.#mgr.close(instance).catch((e: unknown) => this.#log(`manager CLOSE ${instance}: ${(e as Error).message}`));
  }
}
