// The factory: a new VM's TPM (2.0, or 1.2 with its one RSA EK) is manufactured here, in the manager,
// at its first OPEN and before the OPEN is answered, so that no backend, vTPM domain or QEMU ever sees it
// unfinished, whichever mode the host runs in. Its EK certificates are issued by the host CA and locked
// into the TCG indices; its permanent state goes to the manager's store like any save. The VM's permanent state existing is what
// "manufactured" means: it is never done twice, and a migrated-in VM (which arrives with state) is never
// re-manufactured.
//
// Deriving the RSA EK is most of the work, so the next TPM is made ahead of time: fresh seeds, its EK
// public keys derived, then powered off (its clock does not run while it waits). It lives only in this
// process's memory, seen by no one, until an OPEN takes it: certificates, NV writes, and its permanent
// state stored under the VM's instance before the OPEN is answered (docs/ek-certificates.md).
import { TpmHost } from '../tpm/host.js';
import type { TpmInstance } from '../tpm/instance.js';
import type { StateKind, StateStore } from '../tpm/state-store.js';
import { deriveEks, provisionEk, type EkDerivation } from '../tpm/ek-manufacture.js';
import { manufactureEk12 } from '../tpm/ek12.js';
import type { EkCa } from './ca.js';
import { DEFAULT_PLATFORM, type PlatformIdentity } from './ca-files.js';
import { Status, type EkCode } from './wire.js';
import { Refusal } from './refusal.js';
import type { VmRecord } from './vm-table.js';

/** Per VM: which EK certificates it gets (EkProfile or 'none'), as OPEN carries it (wire.ts). */
export type EkChoice = EkCode;

export interface ManufactureRequest {
  instance: number;
  vmUuid: string;
  choice: Exclude<EkChoice, 'none'>;
  /** The manager's store for this instance (sealed saves). */
  store: StateStore;
}

/** Where a TPM made ahead of time keeps its state until an OPEN takes it: memory, never shown to anyone. */
class StagingStore implements StateStore {
  readonly blobs = new Map<StateKind, Uint8Array>();
  async load(_i: number, kind: StateKind): Promise<Uint8Array | null> {
    return this.blobs.get(kind) ?? null;
  }
  async store(_i: number, kind: StateKind, blob: Uint8Array): Promise<void> {
    this.blobs.set(kind, blob.slice());
  }
  async delete(_i: number, kind: StateKind): Promise<void> {
    this.blobs.delete(kind);
  }
}

interface Prepared {
  tpm: TpmInstance;
  staging: StagingStore;
  derived: EkDerivation;
}

export class Factory {
  readonly #host = new TpmHost();
  #next: Promise<Prepared> | null = null;
  #closed = false;
  /** Numbers within this factory's own host only: a staged TPM's state is stored under the VM's instance. */
  #seq = 1;

  constructor(
    readonly ca: EkCa,
    readonly log: (line: string) => void,
    /** What the platform certificate of a new TPM 2.0 names. */
    readonly platform: PlatformIdentity = DEFAULT_PLATFORM,
  ) {
    this.#prepareNext();
  }

  #prepareNext(): void {
    if (this.#closed) return;
    const p = this.#prepare();
    p.catch((err: unknown) => this.log(`factory: preparing the next TPM failed (the next OPEN makes one itself): ${(err as Error).message}`));
    this.#next = p;
  }

  async #prepare(): Promise<Prepared> {
    const staging = new StagingStore();
    const tpm = await this.#host.create({ instance: this.#seq++, version: '2.0', store: staging });
    try {
      const derived = await deriveEks(tpm, ['rsa', 'ecc']);
      await tpm.powerOff();
      return { tpm, staging, derived };
    } catch (err) {
      await tpm.destroy().catch(() => undefined);
      throw err;
    }
  }

  async #take(): Promise<Prepared> {
    const p = this.#next;
    this.#next = null;
    const got = p ? await p.catch(() => null) : null;
    return got ?? this.#prepare();
  }

  /** Manufacture one TPM 2.0 into `r.store`; on any error nothing is stored and the error thrown. */
  async manufacture(r: ManufactureRequest): Promise<string> {
    const t0 = performance.now();
    const { tpm, staging, derived } = await this.#take();
    this.#prepareNext();
    try {
      await tpm.powerOn();
      const certs = await provisionEk(tpm, derived, r.choice, { issue: (pub, id) => this.ca.issueEk(pub, id, r.vmUuid), platform: (ek) => this.ca.issuePlatform(ek, this.platform) });
      await this.#store(tpm, staging, r);
      return `${[...certs].map(([alg, der]) => `${alg === 'platform' ? 'platform' : `${alg} EK`} certificate (${der.length} bytes)`).join(', ')} in ${Math.round(performance.now() - t0)} ms`;
    } finally {
      await tpm.destroy().catch(() => undefined);
    }
  }

  /** Power the finished TPM off and store its permanent state under the VM's instance. */
  async #store(tpm: TpmInstance, staging: StagingStore, r: Pick<ManufactureRequest, 'instance' | 'store'>): Promise<void> {
    await tpm.powerOff();
    const permanent = staging.blobs.get('permanent');
    if (!permanent) throw new Error('the manufactured TPM left no permanent state');
    await r.store.store(r.instance, 'permanent', permanent);
  }

  /**
   * One TPM 1.2 into `r.store`, made on the OPEN's path (its EK is created by the TPM itself, so nothing
   * can be prepared ahead); on any error nothing is stored.
   */
  async manufacture12(r: Omit<ManufactureRequest, 'choice'>): Promise<string> {
    const t0 = performance.now();
    const staging = new StagingStore();
    const tpm = await this.#host.create({ instance: this.#seq++, version: '1.2', store: staging });
    try {
      const der = await manufactureEk12(tpm, { issue: (modulus, id) => this.ca.issueEk12(modulus, id) });
      await this.#store(tpm, staging, r);
      return `rsa EK certificate (${der.length} bytes) in ${Math.round(performance.now() - t0)} ms`;
    } finally {
      await tpm.destroy().catch(() => undefined);
    }
  }

  /**
   * At OPEN: a TPM with no permanent state has never been seen by anyone, so it is made now, with
   * the certificates `choice` names; `vm.ek` records that (only once done: a crash half-way leaves no
   * state and no mark, and the next OPEN makes it). 'none' leaves it to the TPM's first power-on.
   */
  async atOpen(vm: VmRecord, created: boolean, choice: EkChoice, store: StateStore): Promise<void> {
    if (vm.ek !== undefined || vm.status !== 'open') return;
    // A VM made before (by its first power-on, or migrated in) is never made again.
    if (!created && (await store.load(vm.instance, 'permanent')) !== null) return;
    // A TPM 1.2 has one EK, an RSA key: a choice without RSA leaves it uncertified.
    if (choice === 'none' || (vm.version === '1.2' && choice === 'ecc')) {
      vm.ek = choice;
      return;
    }
    try {
      const what =
        vm.version === '1.2'
          ? await this.manufacture12({ instance: vm.instance, vmUuid: vm.vmUuid, store })
          : await this.manufacture({ instance: vm.instance, vmUuid: vm.vmUuid, choice, store });
      vm.ek = choice;
      this.log(`manufactured instance ${vm.instance} for vm ${vm.vmUuid}: ${what}`);
    } catch (err) {
      throw new Refusal(Status.FAIL, `manufacture of vm ${vm.vmUuid} failed, its vTPM was not created: ${(err as Error).message}`);
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#next?.catch(() => undefined);
    await this.#host.destroyAll();
  }
}
