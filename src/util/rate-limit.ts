// Lines about a misbehaving peer, at most `burst` per offender per interval: those are written, the
// rest are counted and the count goes out when the interval ends (or at flush), so a guest flooding bad
// requests cannot flood the log while a few different mistakes still show each. Imports nothing.

export const REFUSAL_BURST = 5;
export const REFUSAL_INTERVAL_MS = 10_000;

export class LogRateLimiter {
  readonly #intervalMs: number;
  readonly #burst: number;
  readonly #write: (line: string) => void;
  readonly #open = new Map<string, { until: number; written: number; suppressed: number; timer: NodeJS.Timeout }>();

  constructor(write: (line: string) => void, intervalMs = REFUSAL_INTERVAL_MS, burst = REFUSAL_BURST) {
    this.#write = write;
    this.#intervalMs = intervalMs;
    this.#burst = burst;
  }

  /** Log `line` about `offender` unless `burst` lines about it went out in this interval already. */
  line(offender: string, line: string): void {
    let o = this.#open.get(offender);
    if (o && Date.now() >= o.until) {
      this.#close(offender);
      o = undefined;
    }
    if (!o) {
      const timer = setTimeout(() => this.#close(offender), this.#intervalMs);
      timer.unref();
      this.#open.set(offender, (o = { until: Date.now() + this.#intervalMs, written: 0, suppressed: 0, timer }));
    }
    if (o.written < this.#burst) {
      o.written++;
      this.#write(line);
    } else o.suppressed++;
  }

  #close(offender: string): void {
    const o = this.#open.get(offender);
    if (!o) return;
    clearTimeout(o.timer);
    this.#open.delete(offender);
    if (o.suppressed > 0) this.#write(`${offender}: ${o.suppressed} more refusals in ${this.#intervalMs / 1000} s (not logged one by one)`);
  }

  /** The offender is gone (its connection closed): write its pending count now. */
  end(offender: string): void {
    this.#close(offender);
  }

  /** Write the pending counts now (shutdown). */
  flush(): void {
    for (const k of [...this.#open.keys()]) this.#close(k);
  }
}
