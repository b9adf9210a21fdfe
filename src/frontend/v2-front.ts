// The frontend role of the tpmif v2 shared page, as Linux xen-tpmfront plays it: one zeroed page
// granted read-write to the backend, an unbound event channel; a command is written at 8 + 4n, then
// `length`, then state SUBMIT last; the response is ready when the backend writes FINISH (IDLE means
// the command was cancelled).
//
// Waiting for the answer: with a poll window (src/xen/poll.ts) the frontend keeps its port masked and
// watches the state byte for up to the window before it sleeps on the event channel, so a backend that
// answers within microseconds costs neither side a wake-up. Linux's TPM core polls the chip's status
// the same way; here the window adapts and closes for commands that run long.
import { PollWindow, spinUntil, type Domain } from '../xen/index.js';
import {
  TPMIF_STATE_CANCEL,
  TPMIF_STATE_FINISH,
  TPMIF_STATE_IDLE,
  TPMIF_STATE_SUBMIT,
  V2_LENGTH,
  V2_LOCALITY,
  V2_MAX_DATA,
  V2_STATE,
  v2DataOffset,
} from '../xen/tpmif.js';
import { FrontendError, type TpmTransport, type TransmitOptions } from './transport.js';
import { endAccessEventually } from './grants.js';

export class V2Front implements TpmTransport {
  readonly protocol = 'v2' as const;
  readonly refs: readonly number[];
  readonly port: number;
  readonly #dom: Domain;
  readonly #gfn: number;
  readonly #page: Uint8Array;
  readonly #dv: DataView;
  #chain: Promise<unknown> = Promise.resolve();
  #wake: (() => void) | null = null;
  #closed = false;
  readonly #poll: PollWindow;

  constructor(dom: Domain, backDomid: number, opts: { pollUs?: number } = {}) {
    this.#poll = new PollWindow(opts.pollUs);
    this.#dom = dom;
    this.#gfn = dom.allocFrames(1);
    this.#page = dom.frames(this.#gfn);
    this.#dv = new DataView(this.#page.buffer, this.#page.byteOffset, this.#page.byteLength);
    this.refs = [dom.grants.grantAccess(backDomid, this.#gfn)];
    this.port = dom.evtchn.allocUnbound(backDomid);
    dom.evtchn.on(this.port, () => this.#wake?.());
  }

  get sharedPage(): Uint8Array {
    return this.#page;
  }

  #state(): number {
    return Atomics.load(this.#page, V2_STATE);
  }

  /** Wait for a notification after which `done()` holds; notifications carry no data, so re-check. */
  #until(done: () => boolean): Promise<void> {
    if (done()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#wake = () => {
        if (this.#closed) reject(new FrontendError('ENODEV', 'frontend closed'));
        else if (done()) {
          this.#wake = null;
          resolve();
        }
      };
    });
  }

  /** Sleep on the event channel until `done()`: unmasked first, so a notification can wake us. */
  async #wait(done: () => boolean): Promise<void> {
    if (done()) return;
    // unmask() delivers a notification that arrived while masked (on a later turn, after #until has
    // installed its waker), so nothing between the last look and the sleep is lost.
    this.#dom.evtchn.unmask(this.port);
    await this.#until(done);
  }

  transmit(command: Uint8Array, opts: TransmitOptions = {}): Promise<Uint8Array> {
    const run = this.#chain.then(() => this.#transmitOne(command, opts.locality ?? 0));
    this.#chain = run.catch(() => undefined);
    return run;
  }

  async #transmitOne(command: Uint8Array, locality: number): Promise<Uint8Array> {
    if (this.#closed) throw new FrontendError('ENODEV', 'frontend closed');
    if (command.length > V2_MAX_DATA) throw new FrontendError('E2BIG', `command of ${command.length} bytes exceeds ${V2_MAX_DATA}`);
    // As vtpm_send: the device must be idle (IDLE or FINISH) before a new command goes in.
    await this.#wait(() => {
      const s = this.#state();
      return s === TPMIF_STATE_IDLE || s === TPMIF_STATE_FINISH;
    });
    const off = v2DataOffset(0);
    this.#page.set(command, off);
    this.#dv.setUint32(V2_LENGTH, command.length, true);
    this.#page[V2_LOCALITY] = locality;
    const answered = (): boolean => {
      const s = this.#state();
      return s === TPMIF_STATE_FINISH || s === TPMIF_STATE_IDLE;
    };
    const budget = this.#poll.budgetUs;
    const t0 = performance.now();
    // Masked before SUBMIT is visible, so the backend's FINISH notification cannot wake us mid-poll.
    if (budget > 0) this.#dom.evtchn.mask(this.port);
    Atomics.store(this.#page, V2_STATE, TPMIF_STATE_SUBMIT);
    this.#dom.evtchn.send(this.port);
    if (budget > 0 && spinUntil(answered, budget)) {
      // The port stays masked while we are this busy: the FINISH notification, if the backend's send
      // lands after our look, then wakes nobody. #wait() unmasks before anything sleeps.
      this.#dom.evtchn.consume(this.port);
    } else {
      await this.#wait(answered);
    }
    this.#poll.record((performance.now() - t0) * 1000);
    if (this.#state() === TPMIF_STATE_IDLE) throw new FrontendError('ECANCELED', 'command cancelled by the backend');
    // Never trust the backend's length beyond the page.
    const len = Math.min(this.#dv.getUint32(V2_LENGTH, true), V2_MAX_DATA);
    return this.#page.slice(off, off + len);
  }

  cancel(): void {
    if (this.#closed) return;
    const s = this.#state();
    if (s === TPMIF_STATE_SUBMIT) {
      Atomics.store(this.#page, V2_STATE, TPMIF_STATE_CANCEL);
      this.#dom.evtchn.send(this.port);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    this.#dom.evtchn.close(this.port);
    await endAccessEventually(this.#dom, this.refs);
    this.#dom.freeFrames(this.#gfn);
  }
}
