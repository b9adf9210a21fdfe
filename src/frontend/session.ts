// GuestSession: a guest's vTPM across suspend/resume and backend restarts (ring protocol). Every
// command gets a u64 id once; until its response arrives it stays in flight and is resubmitted with
// the same id on each new ring, and the backend answers a resubmitted id that already ran from its
// exactly-once table. So a caller's command runs once, and a caller counts it done only when it holds
// the response. Every wait is bounded, as Linux's TPM core bounds each command by its duration: a
// command unanswered past commandTimeoutMs is cancelled and fails ETIME naming its id and command
// code; whether it ran is then unknown to the caller, as after Linux's timeout.
import type { Domain } from '../xen/index.js';
import type { XsClient } from '../xenstore/client.js';
import type { TpmFront } from './tpmfront.js';
import { ReplaceableFront } from './replaceable-front.js';
import { FrontendError } from '../tpmif/transport.js';
import { readHeader } from '../tpm/wire.js';
import { trace } from '../util/trace.js';

export interface InFlight {
  id: bigint;
  command: Uint8Array;
  locality: number;
}

export interface SessionOptions {
  xs: XsClient;
  dom: Domain;
  devid?: number;
  /** Continue an id sequence (resume): the first fresh id. */
  firstId?: bigint;
  /** This domain had the device connected before (resume): build a new ring from Initialising. */
  reconnect?: boolean;
  log?: (line: string) => void;
  /** The device closed for good (backend closing it without a suspend of ours). */
  onClosed?: (reason: string) => void;
  /** Bound on one command, ms (default SESSION_COMMAND_TIMEOUT_MS); one kept across a suspend is bounded again by the resumed session. */
  commandTimeoutMs?: number;
}

/** How long a command may go unanswered (Linux's TPM 2.0 long duration, 120 s, as the v2 transport). */
export const SESSION_COMMAND_TIMEOUT_MS = 120_000;

interface Entry extends InFlight {
  resolve: (r: Uint8Array) => void;
  reject: (e: Error) => void;
}

export class GuestSession {
  readonly #o: SessionOptions;
  readonly #inflight = new Map<bigint, Entry>();
  readonly #fronts: ReplaceableFront;
  #nextId: bigint;
  #suspending = false;
  #closed = false;

  private constructor(o: SessionOptions) {
    this.#o = o;
    this.#nextId = o.firstId ?? 1n;
    this.#fronts = new ReplaceableFront(
      {
        connect: () => ({ xs: o.xs, dom: o.dom, devid: o.devid, protocol: 'ring', firstId: this.#nextId }),
        live: () => !this.#suspending && !this.#closed,
        ...(o.onClosed ? { onClosed: o.onClosed } : {}),
        ...(o.log ? { log: o.log } : {}),
        replacedLine: () => `dom${o.dom.domid}: backend replaced; reconnecting with a new ring, ${this.#inflight.size} request(s) to resubmit`,
      },
      o.reconnect ?? false,
    );
  }

  static async open(o: SessionOptions): Promise<GuestSession> {
    const s = new GuestSession(o);
    await s.#fronts.ready;
    return s;
  }

  get nextId(): bigint {
    return this.#nextId;
  }

  /** Times the frontend was rebuilt because its backend was replaced. */
  get reconnects(): number {
    return this.#fronts.reconnects;
  }

  get front(): TpmFront | null {
    return this.#fronts.current;
  }

  /** Commands sent and not yet answered, oldest first (what a suspended guest must resubmit). */
  inflight(): InFlight[] {
    return [...this.#inflight.values()].map(({ id, command, locality }) => ({ id, command, locality }));
  }

  /** Send one command (a fresh id); resolves with its response, however many rings it takes. */
  submit(command: Uint8Array, opts: { locality?: number } = {}): Promise<Uint8Array> {
    if (this.#suspending || this.#closed) return Promise.reject(new FrontendError('ENODEV', 'device suspended'));
    return this.resubmit({ id: this.#nextId++, command, locality: opts.locality ?? 0 });
  }

  /** Send a command under an id it had before (one left in flight by a suspended or killed guest). */
  resubmit(r: InFlight): Promise<Uint8Array> {
    if (r.id >= this.#nextId) this.#nextId = r.id + 1n;
    return new Promise<Uint8Array>((resolve, reject) => {
      const ms = this.#o.commandTimeoutMs ?? SESSION_COMMAND_TIMEOUT_MS;
      const timer = setTimeout(() => this.#timedOut(r.id, ms), ms);
      const settle = <T>(f: (x: T) => void) => (x: T) => {
        clearTimeout(timer);
        f(x);
      };
      this.#inflight.set(r.id, { ...r, resolve: settle(resolve), reject: settle(reject) });
      void this.#send(r.id);
    });
  }

  /** A command past its bound: cancel it at the backend and fail it, ETIME (Linux: tpm_try_transmit). */
  #timedOut(id: bigint, ms: number): void {
    const e = this.#inflight.get(id);
    // A suspend keeps what is in flight for the next ring: the new session bounds it again.
    if (!e || this.#suspending || this.#closed) return;
    this.#inflight.delete(id);
    this.#fronts.current?.cancel(id);
    // The cancel took an id of the ring's sequence: fresh commands continue above it, never sharing it.
    const ringNext = this.#fronts.current?.nextId;
    if (ringNext !== undefined && ringNext > this.#nextId) this.#nextId = ringNext;
    const code = readHeader(e.command)?.code;
    const what = code === undefined ? `${e.command.length}-byte command` : `command code 0x${code.toString(16).padStart(8, '0')}`;
    e.reject(new FrontendError('ETIME', `request ${id} (${what}) got no answer within ${ms} ms; cancelled`));
  }

  async #send(id: bigint): Promise<void> {
    for (;;) {
      const e = this.#inflight.get(id);
      if (!e) return;
      let f: TpmFront;
      try {
        f = await this.#fronts.ready;
      } catch (err) {
        this.#inflight.delete(id);
        e.reject(err as Error);
        return;
      }
      try {
        const rsp = await f.transmit(e.command, { id, locality: e.locality });
        this.#inflight.delete(id);
        e.resolve(rsp);
        return;
      } catch (err) {
        // The ring went away under the request: it stays in flight (a suspend persists it, a backend
        // reset resubmits it on the next ring). Anything else is this request's own failure.
        const gone = err instanceof FrontendError && err.code === 'ENODEV';
        if (gone && this.#suspending) return;
        if (gone && !this.#closed && this.#fronts.current !== f) continue;
        this.#inflight.delete(id);
        e.reject(err as Error);
        return;
      }
    }
  }

  /**
   * Suspend: no new commands; tell the backend we are closing (it answers what it accepted, cancelling
   * through libtpms past its bound, and saves the vTPM), take those answers, then finish the close.
   * Returns what is still unanswered (only possible if the backend died meanwhile).
   */
  async suspend(opts: { timeoutMs?: number } = {}): Promise<InFlight[]> {
    this.#suspending = true;
    const f = await this.#fronts.ready;
    // Like the 3.x tpmfront, wait for the backend's answer rather than Linux's 5 s close timeout: the
    // backend bounds the in-flight command itself (cancel after its bound).
    await f.close({ timeoutMs: opts.timeoutMs ?? 120_000, suspend: true });
    trace('guest closed');
    // Responses taken from the ring at close settle their callers on the next turns of the loop.
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    this.#closed = true;
    return this.inflight();
  }

  async close(): Promise<void> {
    this.#closed = true;
    const f = this.#fronts.current;
    for (const e of this.#inflight.values()) e.reject(new FrontendError('ENODEV', 'session closed'));
    this.#inflight.clear();
    await f?.close();
  }
}
