// What multi-VM and stub-domain hosts share about their vTPM domains: the domids they hand out, and
// how many crashes of one vTPM they tolerate before giving it up (a crash loop must not spin a core).
import { DOMID_MAX } from '../xenstore/permissions.js';

/** vTPM domains take domids from here up: far from guests' usual low numbers, below DOMID_FIRST_RESERVED. */
export const FIRST_VTPM_DOMID = 0x7000;

export class DomidPool {
  readonly #taken = new Set<number>();
  #next: number;

  /** `inUse` says whether a domid is taken outside this pool (a domain of another host, a xenstore introduction). */
  constructor(
    readonly first: number,
    private readonly inUse: (domid: number) => Promise<boolean>,
  ) {
    this.#next = first;
  }

  has(domid: number): boolean {
    return this.#taken.has(domid);
  }

  /** Keeps a domid a running domain already has (a backend restarted under a running host). */
  keep(domid: number): boolean {
    if (domid < this.first || domid > DOMID_MAX || this.#taken.has(domid)) return false;
    this.#taken.add(domid);
    return true;
  }

  /** The next free domid, round robin so a released one is not reused at once; null when all are taken. */
  async take(): Promise<number | null> {
    for (let i = 0; i <= DOMID_MAX - this.first; i++) {
      const d = this.#next;
      this.#next = d >= DOMID_MAX ? this.first : d + 1;
      if (this.#taken.has(d) || (await this.inUse(d))) continue;
      // Checked again after the await: another open may have taken it meanwhile.
      if (this.#taken.has(d)) continue;
      this.#taken.add(d);
      return d;
    }
    return null;
  }

  release(domid: number): void {
    this.#taken.delete(domid);
  }

  describe(): string {
    return `${this.first}..${DOMID_MAX}`;
  }
}

/** Crashes of one vTPM within a sliding window; more than `max` of them and it is given up. */
export class CrashWindow {
  #times: number[] = [];

  constructor(
    readonly max = 5,
    readonly windowMs = 60_000,
  ) {}

  /** Records a crash now; true when this one is past the limit. */
  record(now = Date.now()): boolean {
    this.#times = this.#times.filter((t) => now - t < this.windowMs);
    this.#times.push(now);
    return this.#times.length > this.max;
  }

  get count(): number {
    return this.#times.length;
  }
}
