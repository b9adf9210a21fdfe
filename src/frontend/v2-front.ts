// The frontend role of the tpmif v2 shared page, as Linux xen-tpmfront plays it: one zeroed page
// granted read-write to the backend, an unbound event channel; a command is written at 8 + 4n, then
// `length`, then state SUBMIT last; the response is ready when the backend writes FINISH (IDLE means
// the command was cancelled). Every wait is bounded as in Linux's TPM core: past its duration a command
// is cancelled and fails ETIME. A command longer than the page's 4088 bytes never reaches it: it gets
// the size error a TPM gives (docs/suspend-and-stress.md).
//
// Waiting for the answer: with a poll window (src/xen/poll.ts) the frontend keeps its port masked and
// watches the state byte for up to the window before it sleeps on the event channel, so a backend that
// answers within microseconds costs neither side a wake-up. Linux's TPM core polls the chip's status
// the same way; here the window adapts and closes for commands that run long.
import { PollWindow, StandAside, spinUntil, type Domain } from '../xen/index.js';
import {
  TPMIF_STATE_CANCEL,
  TPMIF_STATE_FINISH,
  TPMIF_STATE_IDLE,
  TPMIF_STATE_SUBMIT,
  decodeV2Header,
  encodeV2Request,
  setV2State,
  V2_MAX_DATA,
  v2DataOffset,
  v2State,
} from '../xen/tpmif.js';
import { FrontendError, type TpmTransport, type TransmitOptions } from '../tpmif/transport.js';
import { endAccessEventually } from '../tpmif/grants.js';
import { sizeErrorResponse } from '../tpm/error-response.js';

/** How long a command may run before it is cancelled (Linux's TPM 2.0 default duration, 120 s). */
export const V2_COMMAND_TIMEOUT_MS = 120_000;
/** How long the device may take to become idle, or to honour a cancel (Linux's timeout_c is 200 ms). */
export const V2_IDLE_TIMEOUT_MS = 750;

export interface V2FrontOptions {
  pollUs?: number;
  /** When polling stands down (default: CPU pressure, src/xen/poll.ts cpuContended). */
  contended?: () => boolean;
  /** Bound on one command (default V2_COMMAND_TIMEOUT_MS); past it the command is cancelled, ETIME. */
  commandTimeoutMs?: number;
}

export class V2Front implements TpmTransport {
  readonly protocol = 'v2' as const;
  readonly refs: readonly number[];
  readonly port: number;
  readonly #dom: Domain;
  readonly #gfn: number;
  readonly #page: Uint8Array;
  #chain: Promise<unknown> = Promise.resolve();
  #wake: (() => void) | null = null;
  #closed = false;
  readonly #poll: PollWindow;
  /** Waits that stood aside (slept at once) because the other end waited for our CPU. */
  get stoodAside(): number {
    return this.#peer.stoodAside;
  }
  readonly #peer = new StandAside(() => this.#dom.evtchn.sharesCpu(this.port));

  readonly #commandTimeoutMs: number;

  constructor(dom: Domain, backDomid: number, opts: V2FrontOptions = {}) {
    this.#poll = new PollWindow(opts.pollUs, opts.contended);
    this.#commandTimeoutMs = opts.commandTimeoutMs ?? V2_COMMAND_TIMEOUT_MS;
    this.#dom = dom;
    this.#gfn = dom.allocFrames(1);
    this.#page = dom.frames(this.#gfn);
    this.refs = [dom.grants.grantAccess(backDomid, this.#gfn)];
    this.port = dom.evtchn.allocUnbound(backDomid);
    dom.evtchn.on(this.port, () => this.#wake?.());
  }

  get sharedPage(): Uint8Array {
    return this.#page;
  }

  #state(): number {
    return v2State(this.#page);
  }

  /**
   * Wait for a notification after which `done()` holds (notifications carry no data, so re-check), for
   * at most `ms`: false when the time ran out. A backend that died never notifies again.
   */
  #until(done: () => boolean, ms: number): Promise<boolean> {
    if (done()) return Promise.resolve(true);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#wake = null;
        resolve(done());
      }, ms);
      this.#wake = () => {
        if (this.#closed) {
          clearTimeout(timer);
          this.#wake = null;
          reject(new FrontendError('ENODEV', 'frontend closed'));
        } else if (done()) {
          clearTimeout(timer);
          this.#wake = null;
          resolve(true);
        }
      };
    });
  }

  /** Sleep on the event channel until `done()` or `ms` passed: unmasked first, so a notification can wake us. */
  async #wait(done: () => boolean, ms: number): Promise<boolean> {
    if (done()) return true;
    // unmask() delivers a notification that arrived while masked (on a later turn, after #until has
    // installed its waker), so nothing between the last look and the sleep is lost.
    this.#dom.evtchn.resting(this.port, this.#peer.waited);
    this.#peer.waited = false;
    this.#dom.evtchn.unmask(this.port);
    return this.#until(done, ms);
  }

  transmit(command: Uint8Array, opts: TransmitOptions = {}): Promise<Uint8Array> {
    const run = this.#chain.then(() => this.#transmitOne(command, opts.locality ?? 0));
    this.#chain = run.catch(() => undefined);
    return run;
  }

  async #transmitOne(command: Uint8Array, locality: number): Promise<Uint8Array> {
    if (this.#closed) throw new FrontendError('ENODEV', 'frontend closed');
    // The page carries 4088 bytes: a longer command gets the answer a TPM gives one beyond its buffer.
    if (command.length > V2_MAX_DATA) return sizeErrorResponse(command);
    // As vtpm_send: the device must be idle (IDLE or FINISH) before a new command goes in; one that
    // stays busy (a cancel the backend never honoured, a dead backend) is cancelled, ETIME.
    const idle = (): boolean => {
      const s = this.#state();
      return s === TPMIF_STATE_IDLE || s === TPMIF_STATE_FINISH;
    };
    if (!(await this.#wait(idle, V2_IDLE_TIMEOUT_MS))) {
      this.cancel();
      throw new FrontendError('ETIME', `device not idle after ${V2_IDLE_TIMEOUT_MS} ms (backend gone?)`);
    }
    const off = v2DataOffset(0);
    this.#page.set(command, off);
    encodeV2Request(this.#page, command.length, locality);
    const answered = (): boolean => {
      const s = this.#state();
      return s === TPMIF_STATE_FINISH || s === TPMIF_STATE_IDLE;
    };
    const budget = this.#poll.budgetUs;
    const t0 = performance.now();
    // Masked before SUBMIT is visible, so the backend's FINISH notification cannot wake us mid-poll.
    if (budget > 0) this.#dom.evtchn.mask(this.port);
    setV2State(this.#page, TPMIF_STATE_SUBMIT);
    this.#dom.evtchn.send(this.port);
    this.#peer.waited = false;
    if (budget > 0 && spinUntil(answered, budget, undefined, this.#peer)) {
      // The port stays masked while we are this busy: the FINISH notification, if the backend's send
      // lands after our look, then wakes nobody. #wait() unmasks before anything sleeps.
      this.#dom.evtchn.consume(this.port);
    } else if (!(await this.#wait(answered, this.#commandTimeoutMs))) {
      // As Linux's tpm_try_transmit: past the command's duration, cancel and give up on it.
      this.cancel();
      this.#poll.record((performance.now() - t0) * 1000);
      throw new FrontendError('ETIME', `no answer within ${this.#commandTimeoutMs} ms; cancelled`);
    }
    this.#poll.record((performance.now() - t0) * 1000);
    // Answered: nothing for the backend to wait on us for until our next command (ring-front.ts).
    this.#dom.evtchn.resting(this.port);
    if (this.#state() === TPMIF_STATE_IDLE) throw new FrontendError('ECANCELED', 'command cancelled by the backend');
    // Never trust the backend's length beyond the page.
    const len = Math.min(decodeV2Header(this.#page).length, V2_MAX_DATA);
    return this.#page.slice(off, off + len);
  }

  cancel(): void {
    if (this.#closed) return;
    const s = this.#state();
    if (s === TPMIF_STATE_SUBMIT) {
      setV2State(this.#page, TPMIF_STATE_CANCEL);
      this.#dom.evtchn.send(this.port);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    this.#dom.evtchn.close(this.port);
    // Nobody maps the page any more: kept backed for the next device; else back to the hypervisor.
    if (await endAccessEventually(this.#dom, this.refs)) this.#dom.releaseFrames(this.#gfn);
    else this.#dom.freeFrames(this.#gfn);
  }
}
