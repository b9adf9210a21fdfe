// V2Session: a guest's tpmif v2 device over its lifetime, as Linux's xen-tpmfront and TPM core keep it.
// After a resume, or when a restarted backend takes the device over (its InitWait while we are
// connected), a new page and event channel connect. The page carries no request ids, so a command
// whose page went away under it may or may not have run: it gets a TPM failure answer at once and is
// never sent again (at most once). A command in flight at suspend is answered by the backend before it
// acknowledges the suspend (docs/suspend-and-stress.md). No wait is unbounded: V2Front cancels a
// command past its duration.
import type { Domain } from '../xen/index.js';
import type { XsClient } from '../xenstore/client.js';
import { failureResponse } from '../tpm/error-response.js';
import type { TpmFront } from './tpmfront.js';
import { ReplaceableFront } from './replaceable-front.js';
import type { InFlight } from './session.js';
import type { TransmitOptions } from '../tpmif/transport.js';
import { autoStartup } from './startup.js';

export interface V2SessionOptions {
  xs: XsClient;
  dom: Domain;
  devid?: number;
  /** This domain had the device connected before (resume, a killed guest's successor): new page from Initialising. */
  reconnect?: boolean;
  /** Bound on one command before it is cancelled (V2Front's default: 120 s). */
  commandTimeoutMs?: number;
  log?: (line: string) => void;
  /** The device closed for good (the backend closed it without a suspend of ours). */
  onClosed?: (reason: string) => void;
}

export class V2Session {
  readonly #o: V2SessionOptions;
  readonly #fronts: ReplaceableFront;
  #suspending = false;
  #closed = false;
  /** Times the frontend built a new page because its backend was replaced. */

  private constructor(o: V2SessionOptions) {
    this.#o = o;
    this.#fronts = new ReplaceableFront(
      {
        connect: () => ({ xs: o.xs, dom: o.dom, devid: o.devid, protocol: 'v2', commandTimeoutMs: o.commandTimeoutMs }),
        live: () => !this.#suspending && !this.#closed,
        ...(o.onClosed ? { onClosed: o.onClosed } : {}),
        ...(o.log ? { log: o.log } : {}),
        replacedLine: () => `dom${o.dom.domid}: backend replaced; reconnecting with a new page (a command in flight got a TPM failure answer)`,
        // A new page is Linux's remove + probe, and its probe starts a TPM that says it was never started:
        // the v2 page has no per-command checkpoint, so a vTPM whose backend died lost its volatile state.
        afterReplace: async (f) => {
          const r = await autoStartup((cmd) => f.transmit(cmd)).catch((e: unknown) => (o.log?.(`startup probe: ${(e as Error).message}`), null));
          if (r?.outcome === 'started') o.log?.(`dom${o.dom.domid}: TPM ${r.version} had lost its volatile state with the backend; started again (Startup CLEAR)`);
        },
      },
      o.reconnect ?? false,
    );
  }

  static async open(o: V2SessionOptions): Promise<V2Session> {
    const s = new V2Session(o);
    await s.#fronts.ready;
    return s;
  }

  /** Times the frontend was rebuilt because its backend was replaced. */
  get reconnects(): number {
    return this.#fronts.reconnects;
  }

  get front(): TpmFront | null {
    return this.#fronts.current;
  }

  /**
   * One command; always resolves with a TPM response. What the transport cannot deliver (page gone,
   * no answer within the bound, no backend to reconnect to) is answered TPM_RC_FAILURE (1.2: TPM_FAIL).
   */
  async submit(command: Uint8Array, opts: TransmitOptions = {}): Promise<Uint8Array> {
    if (this.#suspending || this.#closed) return failureResponse(command);
    try {
      const f = await this.#fronts.ready;
      return await f.transmit(command, { locality: opts.locality });
    } catch (err) {
      this.#o.log?.(`dom${this.#o.dom.domid}: command failed on the v2 page: ${(err as Error).message}`);
      return failureResponse(command);
    }
  }

  cancel(): void {
    this.#fronts.current?.cancel();
  }

  /**
   * Suspend: Closing; the backend answers the command in flight (cancelling it past its bound), saves
   * the vTPM and goes Closing; then Closed and the page is released. Nothing is left to resubmit: the
   * page has no ids.
   */
  async suspend(opts: { timeoutMs?: number } = {}): Promise<InFlight[]> {
    this.#suspending = true;
    const f = await this.#fronts.ready;
    await f.close({ timeoutMs: opts.timeoutMs ?? 120_000, suspend: true });
    this.#closed = true;
    return [];
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#fronts.current?.close();
  }
}
