// Multi-VM mode (docs/multi-vm.md): every guest's vTPM runs alone in a vTPM-domain process
// with its own domid, and its own FIFO pair to the manager. The backend reaches each domain over a
// shared-memory ring whose pages it grants to that domid: the backend is the ring's frontend
// (RingFront), the domain its backend (RingChannel and ExactlyOnce in vtpm-domain-main.ts). Lifecycle
// goes over the domain's control frames (VtpmDomain).
//
// Isolation: a domain that dies (kill -9, a crash) hurts only its own guest. A new incarnation (a new
// domid, as a restarted stub domain gets) powers on from the manager's last checkpoint; a guest's ring
// request in flight is sent again with its id, so the domain's exactly-once table answers it or it runs
// once on the state from before it. Without a checkpoint (a v2 guest) the TPM is started with
// Startup(CLEAR): NV and persistent objects stay, volatile state is lost as in a TPM reset. The other
// guests' domains are other processes and the backend only does bookkeeping on their behalf.
import { CrashWindow, DomidPool, FIRST_VTPM_DOMID } from './domain-pool.js';
import fs from 'node:fs';
import { join } from 'node:path';
import { createDomainConnection, domainExists, type Domain } from '../xen/index.js';
import { RingFront } from '../tpmif/ring-front.js';
import type { ManagerClient } from '../manager/client.js';
import { handPair, type HandedPair } from '../manager/fifo-client.js';
import { VtpmDomain, type DomainLaunch } from './vtpm-domain.js';
import type { SwtpmVtpm } from '../tpm/vtpm.js';
import type { TpmVersion } from '../tpm/wire.js';
import { ProviderError, type OpenMode, type VtpmProvider, type VtpmSession } from './provider.js';
import { domainNodeFlags } from './domain-flags.js';
import { backendMetrics } from '../util/metrics.js';

export interface MultiVmOptions {
  /** dom0: grants the rings' pages, so it needs frames and grant entries for every domain (33 each). */
  dom: Domain;
  /** The backend's own client: console OPEN / CLOSE and DELETE of volatile state. */
  mgr: ManagerClient;
  managerRunDir: string;
  xenDir: string;
  /** Where domains register themselves (RUN/vtpm-domains). */
  registerDir: string;
  log: (line: string) => void;
  firstDomid?: number;
  /** Restarts allowed within restartWindowMs before a vTPM is given up (default 5 in 60 s). */
  maxRestarts?: number;
  restartWindowMs?: number;
  /** A command the domain does not answer in this time kills the domain (default 120 s; RSA key generation takes seconds). */
  commandTimeoutMs?: number;
  /**
   * How vTPM-domain processes are exec'd (under their own uids when the host isolates domains). Such a
   * domain cannot reach the manager's FIFOs: the backend attaches its pair, bound to its instance, and
   * hands the two ends over as descriptors (a manager restart then ends the domain, restarted as a crash).
   */
  launch?: DomainLaunch;
}

interface Incarnation {
  domid: number;
  domain: VtpmDomain;
  front: RingFront;
}

interface Slot {
  instance: number;
  vm: string;
  version: '2.0' | '1.2';
  current: Incarnation | null;
  /** The incarnation commands go to; a restart replaces it with the new one's start-up. */
  ready: Promise<Incarnation>;
  crashes: CrashWindow;
  released: boolean;
}

export class MultiVmError extends Error {
  constructor(
    readonly code: 'GIVEN_UP' | 'RELEASED' | 'NO_DOMID',
    message: string,
  ) {
    super(message);
    this.name = 'MultiVmError';
  }
}

export class MultiVmVtpms implements VtpmProvider {
  readonly #o: MultiVmOptions;
  readonly #slots = new Map<number, Slot>();
  readonly #opening = new Map<number, Promise<Slot>>();
  readonly #domids: DomidPool;
  /** Every crash seen (tests and status read it). */
  restarts = 0;

  constructor(o: MultiVmOptions) {
    this.#o = o;
    this.#domids = new DomidPool(o.firstDomid ?? FIRST_VTPM_DOMID, (d) => domainExists(o.xenDir, d));
  }

  /** The running domains: instance → {domid, pid}. */
  domains(): Array<{ instance: number; vm: string; domid: number; pid: number }> {
    return [...this.#slots.values()]
      .filter((s) => s.current)
      .map((s) => ({ instance: s.instance, vm: s.vm, domid: s.current!.domid, pid: s.current!.domain.pid }));
  }

  open(vmUuid: string, version: TpmVersion, mode: { resume: boolean }): Promise<VtpmSession>;
  open(vmUuid: string, version: TpmVersion, mode: { qemu: true }): Promise<SwtpmVtpm>;
  async open(vmUuid: string, version: TpmVersion, mode: OpenMode): Promise<VtpmSession> {
    // QEMU's endpoint drives swtpm's controls on the TPM itself; here the TPM is in another process.
    if ('qemu' in mode) throw new ProviderError('NO_QEMU', 'multi-VM mode cannot serve QEMU endpoints (its vTPMs run in vTPM domains)');
    const resume = mode.resume;
    const { instance, created } = await this.#o.mgr.open({ vmUuid, version });
    let slot = this.#slots.get(instance);
    if (!slot) {
      let p = this.#opening.get(instance);
      if (!p) {
        p = this.#openSlot(instance, vmUuid, version, resume, created).finally(() => this.#opening.delete(instance));
        this.#opening.set(instance, p);
      }
      slot = await p;
    }
    return this.#target(slot);
  }

  async #openSlot(instance: number, vm: string, version: '2.0' | '1.2', resume: boolean, created: boolean): Promise<Slot> {
    // A fresh attach boots the vTPM (the guest sends Startup); only a resume keeps volatile state.
    if (!resume && !created) await this.#o.mgr.delete(instance, 'volatile');
    const slot: Slot = { instance, vm, version, current: null, ready: Promise.reject(new Error('not started')), crashes: new CrashWindow(this.#o.maxRestarts, this.#o.restartWindowMs), released: false };
    slot.ready.catch(() => undefined);
    slot.ready = this.#boot(slot, false);
    const inc = await slot.ready;
    this.#slots.set(instance, slot);
    this.#o.log(`vTPM instance ${instance} (${version}) ${created ? 'created' : resume ? 'resumed' : 'loaded'} for VM ${vm} in vTPM domain ${inc.domid} (pid ${inc.domain.pid})`);
    return slot;
  }

  /** Start one incarnation: grant its ring, spawn the domain on it, wait for READY (and Startup after a crash). */
  async #boot(slot: Slot, afterCrash: boolean): Promise<Incarnation> {
    const domid = await this.#domids.take();
    if (domid === null) throw new MultiVmError('NO_DOMID', `no free domid in ${this.#domids.describe()}`);
    let front: RingFront;
    try {
      front = new RingFront(this.#o.dom, domid, { segments: 1 });
    } catch (err) {
      this.#domids.release(domid);
      throw err;
    }
    let domain: VtpmDomain;
    let pair: HandedPair | null = null;
    try {
      if (this.#o.launch) pair = await handPair(this.#o.managerRunDir, { name: `vtpm-domain-${domid}`, bind: slot.instance });
      // dom0 creates the domain and hands its process the connection: it opens nothing of ours.
      const hvFd = await createDomainConnection({ domid, dir: this.#o.xenDir });
      domain = await VtpmDomain.start({
        hvFd,
        instance: slot.instance,
        domid,
        version: slot.version,
        vm: slot.vm,
        front,
        frontDomid: this.#o.dom.domid,
        managerRunDir: this.#o.managerRunDir,
        xenDir: this.#o.xenDir,
        registerDir: this.#o.registerDir,
        nodeFlags: domainNodeFlags(),
        ...(this.#o.launch && pair ? { launch: this.#o.launch, managerFds: pair.fds, onSpawned: pair.release } : {}),
      });
    } catch (err) {
      pair?.discard();
      await this.#destroyRemains(domid, front);
      throw err;
    }
    const inc: Incarnation = { domid, domain, front };
    slot.current = inc;
    domain.once('crash', (ex: { code: number | null; signal: string | null }) => this.#onCrash(slot, inc, ex));
    if (afterCrash) {
      // The crash cost the TPM its volatile state, as a reset does; start it so the guest carries on.
      const rc = await domain.startup('clear');
      if (rc !== 0 && rc !== 0x100) this.#o.log(`vTPM domain ${domid}: Startup(CLEAR) answered 0x${rc.toString(16)}`);
    }
    return inc;
  }

  #onCrash(slot: Slot, inc: Incarnation, ex: { code: number | null; signal: string | null }): void {
    if (slot.current !== inc) return;
    slot.current = null;
    this.restarts++;
    this.#o.log(`vTPM domain ${inc.domid} (instance ${slot.instance}, pid ${inc.domain.pid}) died (code ${ex.code}, signal ${ex.signal})`);
    // Synchronously: commands arriving from now on wait for the next incarnation, and the one in flight
    // fails at once (RingFront.close rejects it; the guest-facing channel answers a TPM failure).
    const cleanup = this.#destroyRemains(inc.domid, inc.front);
    const givenUp = slot.crashes.record();
    if (slot.released) return;
    if (givenUp) {
      slot.ready = Promise.reject(new MultiVmError('GIVEN_UP', `vTPM instance ${slot.instance} crashed ${slot.crashes.count} times in ${slot.crashes.windowMs} ms; not restarted`));
      slot.ready.catch(() => undefined);
      this.#o.log(`vTPM instance ${slot.instance}: given up after ${slot.crashes.count} crashes`);
      return;
    }
    slot.ready = cleanup.then(() => this.#boot(slot, true));
    slot.ready.then(
      (n) => {
        backendMetrics().domainRestarts.inc();
        this.#o.log(`vTPM instance ${slot.instance} restarted from its durable state in vTPM domain ${n.domid} (pid ${n.domain.pid})`);
      },
      (err: unknown) => this.#o.log(`vTPM instance ${slot.instance}: restart failed: ${(err as Error).message}`),
    );
  }

  /** What the toolstack does for a destroyed domain: its mappings of our pages, its files, its domid. */
  async #destroyRemains(domid: number, front: RingFront): Promise<void> {
    // Only once the process is gone: the hypervisor released its pins on our pages when its connection
    // closed, so our grants can be ended. After dom0 itself was closed (backend shutdown) nothing is left.
    if (!this.#o.dom.closed) await front.close();
    fs.rmSync(join(this.#o.registerDir, `dom${domid}.json`), { force: true });
    this.#domids.release(domid);
  }

  /**
   * The guest's session: each command goes to the current incarnation. One carrying a ring request id
   * whose domain dies under it is sent again, same id, to the next incarnation: that one restarted from
   * the last checkpoint, so its exactly-once table answers the id or the command runs once.
   */
  #target(slot: Slot): VtpmSession {
    const timeoutMs = this.#o.commandTimeoutMs ?? 120_000;
    return {
      instance: slot.instance,
      execute: async (command, opts) => {
        for (;;) {
          if (slot.released) throw new MultiVmError('RELEASED', `vTPM instance ${slot.instance} was released`);
          const inc = await slot.ready;
          // A domain that stops answering is treated like one that died: killed, restarted; never a hang.
          const timer = setTimeout(() => {
            this.#o.log(`vTPM domain ${inc.domid}: no answer in ${timeoutMs} ms; killing it`);
            process.kill(inc.domain.pid, 'SIGKILL');
          }, timeoutMs);
          try {
            return await inc.domain.execute(command, opts);
          } catch (err) {
            if (!opts.id || slot.current === inc) throw err;
            this.#o.log(`vTPM instance ${slot.instance}: request ${opts.id} sent again to the restarted domain`);
          } finally {
            clearTimeout(timer);
          }
        }
      },
      cancel: () => slot.current?.domain.cancel(),
    };
  }

  async release(instance: number): Promise<void> {
    const slot = this.#slots.get(instance);
    if (slot) {
      this.#slots.delete(instance);
      slot.released = true;
      const inc = await slot.ready.catch(() => null);
      if (inc && slot.current === inc) {
        slot.current = null;
        await inc.domain.saveVolatile().catch((e: unknown) => this.#o.log(`save volatile of ${instance}: ${(e as Error).message}`));
        await inc.domain.stop();
        await this.#destroyRemains(inc.domid, inc.front);
        this.#o.log(`vTPM domain ${inc.domid} (instance ${instance}) stopped`);
      }
    }
    await this.#o.mgr.close(instance).catch((e: unknown) => this.#o.log(`manager CLOSE ${instance}: ${(e as Error).message}`));
  }

  /** Backend shutdown: stop every domain still running (their state made durable first). */
  async stopAll(): Promise<void> {
    await Promise.all([...this.#slots.keys()].map((i) => this.release(i)));
  }
}
