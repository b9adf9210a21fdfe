// Lines about a misbehaving peer, at most one per offender per interval: the first is written, the
// rest are counted and the count goes out with the next line the offender earns (or when the interval
// ends), so a guest flooding bad requests cannot flood the log. Imports nothing.

export class LogRateLimiter {
  readonly #intervalMs: number;
  readonly #write: (line: string) => void;
  readonly #open = new Map<string, { until: number; suppressed: number; timer: NodeJS.Timeout }>();

  constructor(write: (line: string) => void, intervalMs = 10_000) {
    this.#write = write;
    this.#intervalMs = intervalMs;
  }

  /** Log `line` about `offender` unless a line about it went out less than an interval ago. */
  line(offender: string, line: string): void {
    const now = Date.now();
    const o = this.#open.get(offender);
    if (o && now < o.until) {
      o.suppressed++;
      return;
    }
    if (o) this.#close(offender);
    this.#write(line);
    const timer = setTimeout(() => this.#close(offender), this.#intervalMs);
    timer.unref();
    this.#open.set(offender, { until: now + this.#intervalMs, suppressed: 0, timer });
  }

  #close(offender: string): void {
    const o = this.#open.get(offender);
    if (!o) return;
    clearTimeout(o.timer);
    this.#open.delete(offender);
    if (o.suppressed > 0) this.#write(`${offender}: ${o.suppressed} more like the last one in ${this.#intervalMs / 1000} s (not logged one by one)`);
  }

  /** Write the pending counts now (shutdown). */
  flush(): void {
    for (const k of [...this.#open.keys()]) this.#close(k);
  }
}
