// Stub-domain mode, dom0's side (docs/multi-vm.md, stubdom): the Xen 4.x layout, where each guest's
// vTPM domain is its device's backend (stubdom-main.ts) and dom0 only runs the domains' lifecycle. The
// toolstack asks for a vTPM domain by writing /local/domain/0/backend/vtpm-stubdom/<fe>/<devid> (uuid,
// tpm-version, state=1); we OPEN the VM's vTPM at the manager, introduce a new domid to xenstored, attach
// a FIFO pair bound to the instance, start the domain on it and answer `domid` and state=4 (or `error`
// and state=6). The toolstack then writes the guest's device with backend-id = that domid.
//
// A domain that dies (kill -9, a crash) is started again under the same domid from the manager's last
// durable state: its xenstore home and the guest's device stay, so the new incarnation takes the device
// over as a restarted backend does (InitWait) and the guest reconnects with a new ring. Removing the
// node (detach) stops the domain (answers given, state durable), CLOSEs the vTPM and releases the domid.
import fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { createDomainConnection, domainExists } from '../xen/index.js';
import type { XsClient, XsWatch } from '../xenstore/client.js';
import type { ManagerClient } from '../manager/client.js';
import { handPair, type HandedPair } from '../manager/fifo-client.js';
import { CLIENTS_DIR } from '../manager/fifo.js';
import { VtpmDomain, type DomainLaunch } from './vtpm-domain.js';
import { CrashWindow, DomidPool, FIRST_VTPM_DOMID } from './domain-pool.js';

export const STUBDOM_ROOT = '/local/domain/0/backend/vtpm-stubdom';
/** Node states, borrowed from xenbus as for QEMU nodes: Initialising, Connected, Closed. */
export const StubdomNodeState = { INITIALISING: 1, CONNECTED: 4, CLOSED: 6 } as const;

const here = dirname(fileURLToPath(import.meta.url));
/** The stub domain's entry point; from source (tests) the build in dist/. */
export const STUBDOM_MAIN = import.meta.url.endsWith('.ts') ? join(here, '../../dist/src/backend/stubdom-main.js') : join(here, 'stubdom-main.js');

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export interface StubdomOptions {
  /** dom0's xenstore connection (privileged: INTRODUCE, RELEASE). */
  xs: XsClient;
  /** The backend's console client: OPEN / CLOSE. */
  mgr: ManagerClient;
  managerRunDir: string;
  xenDir: string;
  /** Where each domain's own xenstore socket is (xenstored's --domain-socket-dir). */
  domainSocketDir: string;
  registerDir: string;
  log: (line: string) => void;
  /** How a domain is exec'd (its own uid under isolation); with it the backend attaches the manager pair. */
  launch?: DomainLaunch;
  /** Node flags for each domain process (heap limits: docs/multi-vm.md). */
  nodeFlags?: string[];
  maxRestarts?: number;
  restartWindowMs?: number;
}

interface Stubdom {
  key: string;
  fe: number;
  devid: number;
  vm: string;
  version: '2.0' | '1.2';
  instance: number;
  domid: number;
  domain: VtpmDomain | null;
  crashes: CrashWindow;
  /** Incarnations started: each attaches a manager pair of its own name (the dead one's FIFOs stay until removed). */
  incarnation: number;
  /** The manager pair's FIFOs of the running incarnation. */
  pairFiles: string[];
  stopping: boolean;
  /** The start or restart under way. */
  booting: Promise<void>;
}

export class StubdomError extends Error {
  constructor(
    readonly code: 'BAD_NODE' | 'NO_DOMID',
    message: string,
  ) {
    super(message);
    this.name = 'StubdomError';
  }
}

export class StubdomLifecycle {
  readonly #o: StubdomOptions;
  readonly #doms = new Map<string, Stubdom>();
  /** Nodes whose domain is being started (the watch fires for each key the toolstack wrote). */
  readonly #opening = new Set<string>();
  readonly #domids: DomidPool;
  #watch: XsWatch | null = null;
  #chain: Promise<void> = Promise.resolve();
  /** Every crash seen (status and tests read it). */
  restarts = 0;

  private constructor(o: StubdomOptions) {
    this.#o = o;
    this.#domids = new DomidPool(FIRST_VTPM_DOMID, async (d) => (await domainExists(o.xenDir, d)) || (await o.xs.isDomainIntroduced(d)));
  }

  static async start(o: StubdomOptions): Promise<StubdomLifecycle> {
    const l = new StubdomLifecycle(o);
    fs.rmSync(o.registerDir, { recursive: true, force: true });
    fs.mkdirSync(o.registerDir, { recursive: true });
    // The watch fires at registration: nodes written before a (re)started backend are picked up.
    l.#watch = await o.xs.watch(STUBDOM_ROOT, () => {
      l.#chain = l.#chain.then(() => l.#scan()).catch((err: unknown) => o.log(`stubdom scan: ${(err as Error).message}`));
    });
    return l;
  }

  async #scan(): Promise<void> {
    const xs = this.#o.xs;
    const seen = new Set<string>();
    for (const fe of await xs.directory(STUBDOM_ROOT).catch(() => [] as string[])) {
      if (!/^[0-9]+$/.test(fe)) continue;
      for (const id of await xs.directory(`${STUBDOM_ROOT}/${fe}`).catch(() => [] as string[])) {
        if (!/^[0-9]+$/.test(id)) continue;
        const key = `${fe}/${id}`;
        seen.add(key);
        if (this.#doms.has(key) || this.#opening.has(key)) continue;
        const node = `${STUBDOM_ROOT}/${key}`;
        const [uuid, version, state, domid] = await Promise.all(['uuid', 'tpm-version', 'state', 'domid'].map((k) => xs.tryRead(`${node}/${k}`)));
        // Written in one transaction by the toolstack; a node we refused (state 6) stays refused.
        if (state === undefined || state === String(StubdomNodeState.CLOSED)) continue;
        this.#opening.add(key);
        void this.#open(node, key, Number(fe), Number(id), uuid, version, domid).finally(() => this.#opening.delete(key)).catch(async (err: unknown) => {
          this.#o.log(`stubdom ${key}: ${(err as Error).message}`);
          await xs
            .transaction(async (tx) => {
              if (!(await xs.exists(node, tx))) return;
              await xs.write(`${node}/error`, (err as Error).message, tx);
              await xs.write(`${node}/state`, String(StubdomNodeState.CLOSED), tx);
            })
            .catch(() => undefined);
        });
      }
    }
    for (const [key, d] of this.#doms) if (!seen.has(key) && !d.stopping && !this.#opening.has(key)) void this.#stop(d);
  }

  async #open(node: string, key: string, fe: number, devid: number, uuid: string | undefined, version: string | undefined, prior: string | undefined): Promise<void> {
    if (!uuid || !UUID.test(uuid)) throw new StubdomError('BAD_NODE', `${node}/uuid is not a lower-case UUID`);
    if (version !== '2.0' && version !== '1.2') throw new StubdomError('BAD_NODE', `${node}/tpm-version must be 2.0 or 1.2`);
    const { instance, created } = await this.#o.mgr.open({ vmUuid: uuid, version });
    // A node that names a domid already (a backend restarted under a running host) keeps it: the
    // guest's device names it as its backend.
    const named = prior !== undefined && /^[0-9]{1,5}$/.test(prior) ? Number(prior) : -1;
    const domid = this.#domids.keep(named) ? named : await this.#domids.take();
    if (domid === null) {
      await this.#o.mgr.close(instance).catch(() => undefined);
      throw new StubdomError('NO_DOMID', `no free domid in ${this.#domids.describe()}`);
    }
    const d: Stubdom = { key, fe, devid, vm: uuid, version, instance, domid, domain: null, crashes: new CrashWindow(this.#o.maxRestarts, this.#o.restartWindowMs), incarnation: 0, pairFiles: [], stopping: false, booting: Promise.resolve() };
    this.#doms.set(key, d);
    try {
      await this.#o.xs.introduce(domid);
      d.booting = this.#boot(d, created);
      await d.booting;
    } catch (err) {
      this.#doms.delete(key);
      await this.#release(d);
      throw err;
    }
    // The toolstack may have given up meanwhile (its node gone): a write would re-create the node.
    const answered = await this.#o.xs.transaction(async (tx) => {
      if (!(await this.#o.xs.exists(node, tx))) return false;
      await this.#o.xs.write(`${node}/domid`, String(domid), tx);
      await this.#o.xs.write(`${node}/state`, String(StubdomNodeState.CONNECTED), tx);
      return true;
    });
    if (!answered) {
      await this.#stop(d);
      return;
    }
    this.#o.log(`vTPM instance ${instance} (${version}) ${created ? 'created' : 'loaded'} for VM ${uuid} in stub domain ${domid} (pid ${d.domain?.pid}), backend of dom${fe} device ${devid}`);
  }

  async #boot(d: Stubdom, created: boolean): Promise<void> {
    // The hypervisor destroys a domain when its connection closes; a restart waits for that.
    for (let i = 0; i < 250 && (await domainExists(this.#o.xenDir, d.domid)); i++) await sleep(20);
    let pair: HandedPair | null = null;
    try {
      this.#removePair(d);
      if (this.#o.launch) {
        const name = `vtpm-stubdom-${d.domid}-${d.incarnation++}`;
        // A backend that died left its domains' FIFOs under the names its successor counts through again.
        for (const end of ['req', 'rsp']) fs.rmSync(join(this.#o.managerRunDir, CLIENTS_DIR, `${name}.${end}.fifo`), { force: true });
        pair = await handPair(this.#o.managerRunDir, { name, bind: d.instance });
        d.pairFiles = [...pair.files];
      }
      const hvFd = await createDomainConnection({ domid: d.domid, dir: this.#o.xenDir });
      const domain = await VtpmDomain.start({
        hvFd,
        instance: d.instance,
        domid: d.domid,
        version: d.version,
        ...(this.#o.launch && pair ? { launch: this.#o.launch, managerFds: pair.fds, onSpawned: pair.release } : {}),
        entry: {
          script: STUBDOM_MAIN,
          args: [
            '--instance', String(d.instance),
            ...(created ? ['--created'] : []),
            '--domid', String(d.domid),
            '--front-domid', String(d.fe),
            '--devid', String(d.devid),
            '--vm', d.vm,
            '--tpm-version', d.version,
            '--xs-socket', join(this.#o.domainSocketDir, `dom${d.domid}.sock`),
            '--xen-dir', this.#o.xenDir,
            '--register-dir', this.#o.registerDir,
            ...(pair ? ['--manager-fds', '4,5'] : ['--manager-run', this.#o.managerRunDir]),
          ],
        },
        ...(this.#o.nodeFlags ? { nodeFlags: this.#o.nodeFlags } : {}),
      });
      d.domain = domain;
      domain.once('crash', (ex: { code: number | null; signal: string | null }) => this.#onCrash(d, domain, ex));
    } catch (err) {
      pair?.discard();
      throw err;
    }
  }

  #onCrash(d: Stubdom, dead: VtpmDomain, ex: { code: number | null; signal: string | null }): void {
    if (d.domain !== dead || d.stopping) return;
    d.domain = null;
    this.restarts++;
    fs.rmSync(join(this.#o.registerDir, `dom${d.domid}.json`), { force: true });
    this.#removePair(d);
    this.#o.log(`stub domain ${d.domid} (instance ${d.instance}, pid ${dead.pid}) died (code ${ex.code}, signal ${ex.signal})`);
    if (d.crashes.record()) {
      this.#o.log(`vTPM instance ${d.instance}: given up after ${d.crashes.count} crashes in ${d.crashes.windowMs} ms; its guest's device stays without a backend until detached`);
      return;
    }
    // Same domid: the guest's device names it. The new incarnation finds the device Connected and takes
    // it over (InitWait); the guest reconnects with a new ring.
    d.booting = this.#boot(d, false).then(
      () => this.#o.log(`vTPM instance ${d.instance} restarted from its durable state in stub domain ${d.domid} (pid ${d.domain?.pid})`),
      (err: unknown) => this.#o.log(`vTPM instance ${d.instance}: restart failed: ${(err as Error).message}`),
    );
  }

  /** Detach (node gone) or shutdown: STOP (answers given, state durable), CLOSE, release the domid. */
  async #stop(d: Stubdom): Promise<void> {
    d.stopping = true;
    await d.booting.catch(() => undefined);
    const domain = d.domain;
    d.domain = null;
    if (domain?.alive) {
      await domain.saveVolatile().catch((e: unknown) => this.#o.log(`stub domain ${d.domid}: save volatile: ${(e as Error).message}`));
      await domain.stop(10_000);
    }
    this.#doms.delete(d.key);
    await this.#release(d);
    this.#o.log(`stub domain ${d.domid} (instance ${d.instance}) stopped`);
  }

  /** A dead incarnation's FIFOs: the manager dropped the pair when the domain's ends closed. */
  #removePair(d: Stubdom): void {
    for (const f of d.pairFiles) fs.rmSync(f, { force: true });
    d.pairFiles = [];
  }

  async #release(d: Stubdom): Promise<void> {
    this.#removePair(d);
    fs.rmSync(join(this.#o.registerDir, `dom${d.domid}.json`), { force: true });
    // Its xenstore home, its socket and every node it owns go with the domain, as xenstored does.
    if (await this.#o.xs.isDomainIntroduced(d.domid).catch(() => false)) await this.#o.xs.release(d.domid).catch(() => undefined);
    this.#domids.release(d.domid);
    await this.#o.mgr.close(d.instance).catch((e: unknown) => this.#o.log(`manager CLOSE ${d.instance}: ${(e as Error).message}`));
  }

  /** Backend shutdown: stop every domain (state durable first). */
  async stop(): Promise<void> {
    await this.#watch?.close().catch(() => undefined);
    await this.#chain.catch(() => undefined);
    await Promise.all([...this.#doms.values()].map((d) => this.#stop(d)));
  }
}
