// The factory: a new VM's TPM 2.0 is manufactured here, in the manager, at its first OPEN and before the
// OPEN is answered, so that no backend, vTPM domain or QEMU ever sees it unfinished, whichever mode the
// host runs in. The TPM runs on the VM's own state (its seeds are the ones the guest will have); its EK
// certificates are issued by the host CA and locked into the TCG indices; its permanent state goes to the
// manager's store like any save. The VM's permanent state existing is what "manufactured" means: it is
// never done twice, and a migrated-in VM (which arrives with state) is never re-manufactured.
import { TpmHost } from '../tpm/host.js';
import type { StateStore } from '../tpm/state-store.js';
import { manufactureEk } from '../tpm/ek-manufacture.js';
import type { EkCa } from './ca.js';
import type { EkCode } from './wire.js';

/** Per VM: which EK certificates it gets (EkProfile or 'none'), as OPEN carries it (wire.ts). */
export type EkChoice = EkCode;
export const EK_CHOICES: readonly EkChoice[] = ['rsa', 'ecc', 'both', 'none'];

export interface ManufactureRequest {
  instance: number;
  vmUuid: string;
  choice: EkChoice;
  /** The manager's store for this instance (sealed saves). */
  store: StateStore;
}

export class Factory {
  // One spare TPM 2.0 kept ready: a new VM skips seed generation and MainInit; its EKs are still derived on OPEN.
  readonly #host = new TpmHost({ spares: { '2.0': 1, '1.2': 0 } });

  constructor(
    readonly ca: EkCa,
    readonly log: (line: string) => void,
  ) {}

  /** Manufacture one TPM 2.0; on any error its state is deleted again and the error thrown. */
  async manufacture(r: ManufactureRequest): Promise<string> {
    const t0 = performance.now();
    const tpm = await this.#host.create({ instance: r.instance, version: '2.0', store: r.store });
    try {
      let what = 'no EK certificate (--no-ek-cert)';
      if (r.choice !== 'none') {
        const certs = await manufactureEk(tpm, r.choice, { issue: (pub, id) => this.ca.issueEk(pub, id, r.vmUuid) });
        what = [...certs].map(([alg, der]) => `${alg} EK certificate (${der.length} bytes)`).join(', ');
      }
      await tpm.destroy();
      return `${what} in ${Math.round(performance.now() - t0)} ms`;
    } catch (err) {
      await tpm.destroy({ deleteState: true }).catch(() => undefined);
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.#host.destroyAll();
  }
}
