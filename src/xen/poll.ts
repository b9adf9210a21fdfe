// Adaptive busy-polling of shared memory, the idea of KVM's halt-polling and Linux's busy_poll: a
// process that expects an answer within a few microseconds watches the shared ring (its event channel
// masked) instead of sleeping, because a wake-up costs more here than the answer does: a 4-byte write
// that wakes the other CPU measured 12–20 µs, an epoll wake-up of a Node loop as much again.
//
// The window adapts, like halt_poll_ns: it stays open while waits end within it. A wait that had to
// sleep is longer than the answer itself (the two wake-ups it adds cost 40–100 µs here), so a sleeping
// wait of up to SLEEP_SLACK windows still counts as short and reopens it; after longer waits it stays
// shut, and every PROBE_EVERY-th wait polls anyway, in case the peer got fast again. A process whose
// peer is slow or busy (keygen, many guests) thus wastes at most one window per PROBE_EVERY waits.
// A poll that misses by a little is not wasted: it keeps its vCPU from halting, so the message that
// ends the wait wakes it cheaply. A peer on our own vCPU cannot answer while we spin: spinUntil's
// SpinPeer says so per check, and the spin ends (docs/protocols/event-channels.md).
import fs from 'node:fs';
import os from 'node:os';

const SLEEP_SLACK = 4;
const PROBE_EVERY = 16;

// A poll only pays while the peer has a CPU to answer on. When runnable tasks already wait for CPUs, a
// spinner takes the CPU the peer needs (measured with the machine loaded to ~4× its cores: polled round
// trips took 1.5× as long as slept ones), so polling stands down while Linux's CPU pressure (PSI, some avg10) is above
// this share, as the kernel's own spin loops stop at need_resched(). Without PSI: the load average.
const PRESSURE_LIMIT = 10;
const PRESSURE_EVERY_MS = 250;
let pressureCheckedAt = -Infinity;
let contended = false;

/** Whether the CPUs are contended right now (re-read at most every 250 ms). */
export function cpuContended(now: number = performance.now()): boolean {
  if (now - pressureCheckedAt < PRESSURE_EVERY_MS) return contended;
  pressureCheckedAt = now;
  try {
    const m = /some avg10=([\d.]+)/.exec(fs.readFileSync('/proc/pressure/cpu', 'latin1'));
    contended = m ? Number(m[1]) > PRESSURE_LIMIT : false;
  } catch {
    contended = os.loadavg()[0]! > os.availableParallelism();
  }
  return contended;
}

/** The default window in µs: `VTPM_POLL_US` (0 turns polling off everywhere). */
export function defaultPollUs(): number {
  const v = process.env.VTPM_POLL_US;
  if (v === undefined || v === '') return 50;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0 || n > 10_000) throw new RangeError(`VTPM_POLL_US=${v}: want 0..10000 µs`);
  return n;
}

export class PollWindow {
  readonly maxUs: number;
  #open: boolean;
  #sinceProbe = 0;
  readonly #contended: () => boolean;
  /** When the last answer left with nothing else to do (performance.now()), or -1: the peer's pace starts there. */
  #answeredAt = -1;

  /** `contended` says when to stand down (default: CPU pressure, cpuContended()). */
  constructor(maxUs: number = defaultPollUs(), contended: () => boolean = () => cpuContended()) {
    this.maxUs = maxUs;
    this.#contended = contended;
    this.#open = maxUs > 0;
  }

  /** How long to poll now, in µs (0: go to sleep at once). */
  get budgetUs(): number {
    if (this.maxUs <= 0) return 0;
    if (!this.#open) {
      if (++this.#sinceProbe < PROBE_EVERY) return 0;
      this.#sinceProbe = 0;
    }
    return this.#contended() ? 0 : this.maxUs;
  }

  /** Report how long the last wait lasted in all (polled or slept), in µs. */
  record(waitedUs: number): void {
    this.#open = this.maxUs > 0 && waitedUs <= this.maxUs * SLEEP_SLACK;
  }

  /** A server answered everything it had: the peer's next message will say how long it took (arrived()). */
  answered(now: number = performance.now()): void {
    this.#answeredAt = now;
  }

  /** How the last spin on this window ended and how long it lasted (µs): what a test or trace can look at. */
  lastSpin: { end: string; us: number } | null = null;

  /** Whether an answer is out and the peer's next message has not come yet. */
  get awaiting(): boolean {
    return this.#answeredAt >= 0;
  }

  /** The peer's next message came: how soon it followed the answer decides whether watching for it pays. */
  arrived(now: number = performance.now()): void {
    if (this.#answeredAt < 0) return;
    this.record((now - this.#answeredAt) * 1000);
    this.#answeredAt = -1;
  }
}

/** Ports a spin's other-work check looks at each time (EventChannels.otherPendingSome). */
export const OTHER_PORTS_PER_LOOK = 16;

/**
 * The other end of what a spin waits for, as far as the CPU goes (EventChannels.sharesCpu): whether it
 * is runnable on the very CPU the spinner holds, so that it cannot answer until the spinner lets it.
 */
export interface SpinPeer {
  sharesCpu(): boolean;
}

/** A spin's peer that waits for our CPU when `waits()` says so, counting the spins that stood aside for it. */
export class StandAside implements SpinPeer {
  /** Spins that stood aside (ended at once, so the caller sleeps and the peer runs). */
  stoodAside = 0;
  /** Whether a spin stood aside since the caller last cleared it. */
  waited = false;
  readonly #waits: () => boolean;

  constructor(waits: () => boolean) {
    this.#waits = waits;
  }

  sharesCpu(): boolean {
    if (!this.#waits()) return false;
    this.stoodAside++;
    return (this.waited = true);
  }
}

/**
 * Spin until `done()` or `budgetUs` passed or `giveUp()` says other work waits. Returns whether
 * `done()` came true. Blocks the calling thread for at most the budget (plus one check). `giveUp` is
 * asked once per 16 looks, so it must cost no more than a few of them (EventChannels.otherPendingSome).
 * `peer`, asked as often (and once before the first look), says when the peer waits for our CPU: the
 * spin then ends at once, so the caller sleeps and the peer runs. (sched_yield does not hand the CPU
 * over here: the host's daemons run detached, each in a scheduler autogroup of its own.)
 */
export function spinUntil(done: () => boolean, budgetUs: number, giveUp?: () => boolean, peer?: SpinPeer): boolean {
  if (done()) return true;
  if (budgetUs <= 0) return false;
  const deadline = performance.now() + budgetUs / 1000;
  if (peer?.sharesCpu()) return done();
  for (let i = 1; ; i++) {
    if (done()) return true;
    // The clock and the other-work check cost more than a load of the ring: look at them less often, so
    // the answer is seen within a few loads of its coming.
    if ((i & 15) === 0) {
      if (performance.now() >= deadline) return done();
      if (giveUp?.()) return done();
      if (peer?.sharesCpu()) return done();
    }
  }
}
