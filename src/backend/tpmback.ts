// tpmback: the backend process. Watches /local/domain/0/backend/vtpm for devices the toolstack writes,
// runs one BackendDevice per device, and hands each guest's commands to its vTPM.
import { Domain } from '../xen/index.js';
import { connect, type XsClient, type XsWatch } from '../xenstore/client.js';
import { vtpmDevice } from '../xenstore/xenbus.js';
import { BackendDevice } from './device.js';
import type { VtpmProvider } from './provider.js';
import { QemuDevices } from './qemu-devices.js';
import { XsCaptureRouter } from './capture.js';

export const BACKEND_ROOT = '/local/domain/0/backend/vtpm';

export interface BackendOptions {
  xenDir: string;
  xenstoredSocket: string;
  vtpms: VtpmProvider;
  log: (line: string) => void;
  /** dom0 created by the caller (multi-VM mode sizes it and shares it with its provider); default: created here. */
  domain?: Domain;
}

export class Backend {
  readonly dom: Domain;
  readonly xs: XsClient;
  readonly #o: BackendOptions;
  readonly #devices = new Map<string, BackendDevice>();
  #watch: XsWatch | null = null;
  #qemu: QemuDevices | null = null;
  #scanning: Promise<void> = Promise.resolve();
  /** A scan is queued and has not started: a change seen now is still in what it will read. */
  #scanQueued = false;
  /** What the queued scan looks at: the frontends named by watch events, or (`#scanAll`) every one. */
  readonly #scanFronts = new Set<string>();
  #scanAll = false;
  /** Devices' captures get the xenstore packets that concern them. */
  readonly #captures: XsCaptureRouter;

  private constructor(dom: Domain, xs: XsClient, o: BackendOptions) {
    this.dom = dom;
    this.xs = xs;
    this.#o = o;
    this.#captures = new XsCaptureRouter(xs, o.xenstoredSocket, o.log);
  }

  static async start(o: BackendOptions): Promise<Backend> {
    // One event-channel port per guest device: dom0 takes Xen's full 2-level range (4095 ports).
    const dom = o.domain ?? (await Domain.create({ domid: 0, dir: o.xenDir, geometry: { evtchnPages: 16 } }));
    const xs = await connect(o.xenstoredSocket);
    const b = new Backend(dom, xs, o);
    // The watch fires once at registration, which picks up devices written before we started.
    b.#watch = await xs.watch(BACKEND_ROOT, (ev) => b.#changed(ev.path));
    // QEMU guests (`vtpm qemu attach`) get swtpm-compatible endpoints on the same vTPMs.
    b.#qemu = await QemuDevices.start(xs, o.vtpms, o.log);
    return b;
  }

  get devices(): BackendDevice[] {
    return [...this.#devices.values()];
  }

  /**
   * A watch event under BACKEND_ROOT. A toolstack's device transaction fires one event per key it
   * wrote, so events coalesce into one queued scan of the frontends they name (a rescan of every
   * frontend per event made attaching N devices cost O(N²) directory reads, still running long after).
   */
  #changed(path: string): void {
    const m = /^\/local\/domain\/0\/backend\/vtpm\/([0-9]+)(?:\/([0-9]+))?(\/.)?/.exec(path);
    // A key inside a device we drive already (its state, ready, ...) changes nothing here; skipping
    // those keeps the scan's round trips from queueing ahead of the device's own on this connection.
    if (m?.[2] !== undefined && m[3] !== undefined && this.#devices.has(`${m[1]}/${m[2]}`)) return;
    if (m) this.#scanFronts.add(m[1]!);
    else this.#scanAll = true;
    if (this.#scanQueued) return;
    this.#scanQueued = true;
    this.#scanning = this.#scanning
      .then(() => {
        this.#scanQueued = false;
        const fronts = this.#scanAll ? null : [...this.#scanFronts];
        this.#scanAll = false;
        this.#scanFronts.clear();
        return this.#scan(fronts);
      })
      .catch((err: unknown) => this.#o.log(`scan: ${(err as Error).message}`));
  }

  /** Pick up finished devices of `only` (frontend domids), or of every frontend when null. */
  async #scan(only: string[] | null): Promise<void> {
    let fronts: string[];
    try {
      fronts = only ?? (await this.xs.directory(BACKEND_ROOT));
    } catch {
      return; // nothing there yet
    }
    for (const fe of fronts) {
      if (!/^[0-9]+$/.test(fe)) continue;
      let devids: string[];
      try {
        devids = await this.xs.directory(`${BACKEND_ROOT}/${fe}`);
      } catch {
        continue;
      }
      for (const id of devids) {
        if (!/^[0-9]+$/.test(id)) continue;
        const key = `${fe}/${id}`;
        if (this.#devices.has(key)) continue;
        // Only a device whose directory the toolstack finished (state and frontend written in one
        // transaction) is ours to drive.
        if ((await this.xs.tryRead(`${BACKEND_ROOT}/${key}/state`)) === undefined) continue;
        if ((await this.xs.tryRead(`${BACKEND_ROOT}/${key}/frontend`)) === undefined) continue;
        // A device the toolstack is detaching (online=0) was finished already: picking it up again
        // would re-announce InitWait and loop until its directory is gone.
        if ((await this.xs.tryRead(`${BACKEND_ROOT}/${key}/online`)) === '0') continue;
        const dev = new BackendDevice({
          dom: this.dom,
          xs: this.xs,
          dev: vtpmDevice(Number(fe), Number(id), 0),
          vtpms: this.#o.vtpms,
          log: this.#o.log,
          captures: this.#captures,
          onGone: () => {
            this.#devices.delete(key);
            this.#o.log(`dom${fe}: device ${id} removed`);
          },
        });
        this.#devices.set(key, dev);
        dev.start().catch((err: unknown) => this.#o.log(`dom${fe}: device ${id}: ${(err as Error).message}`));
      }
    }
  }

  async stop(): Promise<void> {
    await this.#watch?.close().catch(() => {});
    await this.#qemu?.stop().catch(() => {});
    await Promise.all(this.devices.map((d) => d.stop().catch(() => {})));
    await this.xs.close().catch(() => {});
    await this.dom.destroy();
  }
}
