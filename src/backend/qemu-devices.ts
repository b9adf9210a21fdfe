// The backend's side of `vtpm qemu attach|detach`: the toolstack writes one node per QEMU vTPM under
// /local/domain/0/backend/vtpm-qemu/<n> (uuid, ctrl, tpm-version, state=1); we open the VM's vTPM,
// start its swtpm-compatible endpoint on `ctrl` and write state=4 once it listens (or `error` and
// state=6). state=5 from the toolstack (or the node vanishing) closes the endpoint; we answer state=6.
import type { XsClient, XsWatch } from '../xenstore/client.js';
import { QemuEndpoint } from './qemu-endpoint.js';
import type { VtpmProvider } from './provider.js';
import { GuestObserver } from './observe.js';
import { GuestCapture } from './capture.js';
import { forgetGuest, showGuest } from '../util/metrics.js';

export const QEMU_ROOT = '/local/domain/0/backend/vtpm-qemu';

/** Node states, borrowed from xenbus: Initialising, Connected, Closing, Closed. */
export const QemuNodeState = { INITIALISING: 1, CONNECTED: 4, CLOSING: 5, CLOSED: 6 } as const;

interface Running {
  ep: QemuEndpoint | null;
  capture?: GuestCapture;
  instance: number | null;
  closing: boolean;
}

export class QemuDevices {
  readonly #xs: XsClient;
  readonly #vtpms: VtpmProvider;
  readonly #log: (l: string) => void;
  readonly #nodes = new Map<string, Running>();
  #watch: XsWatch | null = null;
  #chain: Promise<void> = Promise.resolve();

  private constructor(xs: XsClient, vtpms: VtpmProvider, log: (l: string) => void) {
    this.#xs = xs;
    this.#vtpms = vtpms;
    this.#log = log;
  }

  /** A provider whose vTPMs QEMU cannot drive (ProviderError NO_QEMU) refuses every node with that error. */
  static async start(xs: XsClient, vtpms: VtpmProvider, log: (l: string) => void): Promise<QemuDevices> {
    const d = new QemuDevices(xs, vtpms, log);
    d.#watch = await xs.watch(QEMU_ROOT, () => {
      d.#chain = d.#chain.then(() => d.#scan()).catch((err: unknown) => log(`qemu scan: ${(err as Error).message}`));
    });
    return d;
  }

  async #scan(): Promise<void> {
    let ids: string[] = [];
    try {
      ids = (await this.#xs.directory(QEMU_ROOT)).filter((n) => /^[0-9]+$/.test(n));
    } catch {
      /* root not there yet */
    }
    for (const id of ids) {
      const state = Number(await this.#xs.tryRead(`${QEMU_ROOT}/${id}/state`));
      const have = this.#nodes.get(id);
      if (!have && state === QemuNodeState.INITIALISING) await this.#open(id);
      else if (have && !have.closing && state === QemuNodeState.CLOSING) await this.#close(id, true);
    }
    for (const id of [...this.#nodes.keys()]) if (!ids.includes(id)) await this.#close(id, false);
  }

  async #open(id: string): Promise<void> {
    const node = `${QEMU_ROOT}/${id}`;
    const r: Running = { ep: null, instance: null, closing: false };
    this.#nodes.set(id, r);
    try {
      const uuid = await this.#xs.readString(`${node}/uuid`);
      const ctrl = await this.#xs.readString(`${node}/ctrl`);
      const version = ((await this.#xs.tryRead(`${node}/tpm-version`)) ?? '2.0') as '2.0' | '1.2';
      if (version !== '2.0' && version !== '1.2') throw new Error(`tpm-version ${String(version)} is neither 2.0 nor 1.2`);
      const vtpm = await this.#vtpms.open(uuid, version, { qemu: true });
      r.instance = vtpm.instance;
      // `qemu attach --pcap FILE`: the same capture as a guest's, without the xenstore and ring records.
      const capture = await this.#xs.tryRead(`${node}/capture`);
      if (capture) r.capture = new GuestCapture(capture, Number((await this.#xs.tryRead(`${node}/capture-max-mb`)) ?? 100) * 1024 * 1024 || 100 * 1024 * 1024, 0, Number(id), this.#log);
      const observer = new GuestObserver({ domid: '', vm: uuid, transport: 'qemu' }, r.capture ?? null);
      r.ep = await QemuEndpoint.listen({ path: ctrl, vtpm, log: (l) => this.#log(`qemu ${id}: ${l}`), observer });
      showGuest(r, { domid: '', vm: uuid, transport: 'qemu', state: 'Connected' });
      await this.#xs.write(`${node}/instance`, String(vtpm.instance));
      await this.#xs.write(`${node}/state`, String(QemuNodeState.CONNECTED));
      this.#log(`qemu ${id}: VM ${uuid} vTPM ${vtpm.instance} (${version}) listening on ${ctrl}`);
    } catch (err) {
      const msg = (err as Error).message;
      this.#log(`qemu ${id}: attach failed: ${msg}`);
      await this.#teardown(r);
      this.#nodes.delete(id);
      await this.#xs.write(`${node}/error`, msg).catch(() => {});
      await this.#xs.write(`${node}/state`, String(QemuNodeState.CLOSED)).catch(() => {});
    }
  }

  async #teardown(r: Running): Promise<void> {
    forgetGuest(r);
    await r.ep?.close().catch(() => {});
    await r.capture?.close();
    if (r.instance !== null) await this.#vtpms.release(r.instance).catch(() => {});
  }

  async #close(id: string, answer: boolean): Promise<void> {
    const r = this.#nodes.get(id);
    if (!r) return;
    r.closing = true;
    await this.#teardown(r);
    this.#nodes.delete(id);
    this.#log(`qemu ${id}: detached`);
    if (answer) await this.#xs.write(`${QEMU_ROOT}/${id}/state`, String(QemuNodeState.CLOSED)).catch(() => {});
  }

  async stop(): Promise<void> {
    await this.#watch?.close().catch(() => {});
    await this.#chain;
    for (const id of [...this.#nodes.keys()]) await this.#close(id, false);
  }
}
