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

export class InProcessVtpms implements VtpmProvider, QemuVtpmProvider {
  readonly #host: TpmHost;
  readonly #mgr: ManagerClient;
  readonly #log: (l: string) => void;

  constructor(host: TpmHost, mgr: ManagerClient, log: (l: string) => void) {
    this.#host = host;
    this.#mgr = mgr;
    this.#log = log;
  }

  async open(vmUuid: string, version: '2.0' | '1.2', resume: boolean): Promise<VtpmTarget & { instance: number }> {
    const { instance, created } = await this.#mgr.open({ vmUuid, version });
    let inst = this.#host.get(instance);
    if (!inst || inst.status === 'destroyed') {
      // A fresh attach boots the vTPM (the guest sends Startup); only a resume keeps volatile state.
      if (!resume && !created) await this.#mgr.delete(instance, 'volatile');
      // inline 'fast': GetRandom/PCR_Extend/PCR_Read and the like spend a few µs in libtpms, less than
      // the thread-pool hand-off would cost, so they run on this thread; everything that can take long
      // (key generation, asymmetric crypto) still goes to the pool and never stalls another guest.
      inst = await this.#host.create({ instance, version, store: this.#mgr, inline: 'fast' });
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
    };
  }

  async release(instance: number): Promise<void> {
    const inst = this.#host.get(instance);
    if (inst && inst.status === 'running') await inst.saveVolatile().catch((e: unknown) => this.#log(`save volatile of ${instance}: ${(e as Error).message}`));
    await this.#host.destroy(instance);
    await this.#mgr.close(instance).catch((e: unknown) => this.#log(`manager CLOSE ${instance}: ${(e as Error).message}`));
  }
}
