// The frontend a guest session talks through, across backend replacements: which TpmFront is current,
// the connect that makes the next one, and the reset that starts it when a restarted backend takes the
// device over. A replacement that fires while a connect is still under way is held until that front
// is adopted, so a session never resets a front it does not hold yet. What must survive a replacement
// (ids, requests in flight) stays with the session.
import { TpmFront, type TpmFrontOptions } from './tpmfront.js';

export interface ReplaceableOptions {
  /** Connect options, read at every connect (a ring session's first fresh id moves on). */
  connect: () => Omit<TpmFrontOptions, 'onBackendReset' | 'onClosed' | 'reconnect'>;
  /** False while the session suspends and after it closed: then a replacement or a close is its own doing. */
  live: () => boolean;
  /** The device closed for good under a live session. */
  onClosed?: (reason: string) => void;
  log?: (line: string) => void;
  /** The line a replacement logs. */
  replacedLine: () => string;
  /** What a replacing front needs before it serves (v2: start a TPM that lost its volatile state). */
  afterReplace?: (f: TpmFront) => Promise<void>;
}

export class ReplaceableFront {
  /** The front being served through; null between a replacement and its successor's connect. */
  current: TpmFront | null = null;
  /** The front to send through once it is connected. */
  ready: Promise<TpmFront>;
  /** Times a new front was built because the backend was replaced. */
  reconnects = 0;
  readonly #o: ReplaceableOptions;

  constructor(o: ReplaceableOptions, reconnect: boolean) {
    this.#o = o;
    this.ready = this.#connect(reconnect);
  }

  async #connect(reconnect: boolean): Promise<TpmFront> {
    let f: TpmFront | undefined;
    let resetEarly = false;
    f = await TpmFront.connect({
      ...this.#o.connect(),
      reconnect,
      onClosed: (reason) => {
        if (this.#o.live()) this.#o.onClosed?.(reason);
      },
      onBackendReset: () => (f ? this.#reset(f) : (resetEarly = true)),
    });
    this.current = f;
    if (resetEarly) queueMicrotask(() => this.#reset(f!));
    return f;
  }

  #reset(old: TpmFront): void {
    if (this.current !== old || !this.#o.live()) return;
    this.current = null;
    this.reconnects++;
    this.#o.log?.(this.#o.replacedLine());
    const next = this.#connect(true);
    const after = this.#o.afterReplace;
    this.ready = after ? next.then(async (f) => (await after(f), f)) : next;
    this.ready.catch((e: unknown) => this.#o.log?.(`reconnect failed: ${(e as Error).message}`));
  }
}
