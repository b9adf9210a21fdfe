// The backend role of the ring echo (src/xen/echo-front.ts has the slot layout): maps each frontend's
// granted ring, binds its event channel and answers every request with value+1. It trusts nothing on
// the ring: requests are copied out before they are read (BackRing.takeRequestsInto), and a frontend
// whose indices lie is cut off alone (onReject) while the others keep being served.
//
// After answering, the backend may watch the ring for the frontend's next request for a short adaptive
// window (src/xen/poll.ts) with its port masked, giving way as soon as another frontend's port is
// pending, so a frontend that sends again within microseconds costs neither side a wake-up.
import type { Domain } from './domain.js';
import type { GrantMapping } from './grant-table.js';
import { BackRing, RingError, SharedRing } from './ring.js';
import { PollWindow, spinUntil } from './poll.js';
import { ECHO_OP, ECHO_SLOT, type RingOffer } from './echo-front.js';

/** Longest a backend keeps serving one frontend in one turn of its event loop (ms), polls included. */
const TURN_MS = 2;

interface Conn {
  map: GrantMapping;
  port: number;
  ring: BackRing;
  poll: PollWindow;
  /** When the last answers were published (ms); -1: the next request is not being timed. */
}

export interface EchoBackendOptions {
  /** Poll window in µs (default VTPM_POLL_US, 50; 0: always sleep on the event channel). */
  pollUs?: number;
}

export class EchoBackend {
  readonly dom: Domain;
  readonly #conns = new Map<number, Conn>();
  readonly #pollUs: number | undefined;
  onReject: (frontDomid: number, reason: string) => void = () => {};
  readonly #scratch = new Uint8Array(ECHO_SLOT * 1024);
  readonly #scratchView = new DataView(this.#scratch.buffer);
  served = 0;

  constructor(dom: Domain, opts: EchoBackendOptions = {}) {
    this.dom = dom;
    this.#pollUs = opts.pollUs;
  }

  connect(offer: RingOffer): void {
    const map = this.dom.mapper.mapMany(offer.frontDomid, offer.refs);
    const ring = new BackRing(new SharedRing(map.buffer, ECHO_SLOT));
    const port = this.dom.evtchn.bindInterdomain(offer.frontDomid, offer.port);
    this.#conns.set(offer.frontDomid, { map, port, ring, poll: new PollWindow(this.#pollUs) });
    this.dom.evtchn.on(port, () => this.#service(offer.frontDomid));
  }

  #service(front: number): void {
    const c = this.#conns.get(front);
    if (!c) return;
    const { ring, port } = c;
    const t0 = performance.now();
    c.poll.arrived(t0);
    for (;;) {
      const budget = c.poll.budgetUs;
      // Masked while we look, so the frontend's next notification costs it an atomic OR, not a wake-up.
      if (budget > 0) this.dom.evtchn.mask(port);
      if (!this.#serveAll(front, c)) return;
      c.poll.answered();
      const more = budget > 0 && spinUntil(() => ring.unconsumedRequests() > 0, budget, () => this.dom.evtchn.otherPendingSome(port));
      if (!more) break;
      this.dom.evtchn.consume(port);
      c.poll.arrived();
      if (performance.now() - t0 > TURN_MS) {
        // Other work of this process (IPC, other frontends) gets its turn; we come back at once.
        setImmediate(() => this.#service(front));
        return;
      }
    }
    // Sleep on the event channel again; unmask() delivers a request that raced the last look.
    this.dom.evtchn.unmask(port);
  }

  /** Answer everything on the ring; false if the frontend was cut off. */
  #serveAll(front: number, c: Conn): boolean {
    const { ring, port } = c;
    let notify = false;
    const dv = this.#scratchView;
    const out = ring.sring.view;
    try {
      do {
        const n = ring.takeRequestsInto(this.#scratch);
        for (let i = 0; i < n; i++) {
          const o = i * ECHO_SLOT;
          const off = ring.nextResponseSlot();
          out.setUint32(off, dv.getUint32(o, true), true);
          out.setUint32(off + 4, dv.getUint32(o + 4, true) === ECHO_OP ? 0 : 1, true);
          out.setUint32(off + 8, (dv.getUint32(o + 8, true) + 1) >>> 0, true);
          ring.produceResponse();
          this.served++;
        }
        // Publish as we go so the frontend can refill while we keep working.
        if (ring.pushResponsesAndCheckNotify()) notify = true;
      } while (ring.finalCheckForRequests());
    } catch (err) {
      if (!(err instanceof RingError)) throw err;
      this.disconnect(front);
      this.onReject(front, `dom${front}: ${err.message}`);
      return false;
    }
    if (notify) this.dom.evtchn.send(port);
    return true;
  }

  disconnect(front: number): void {
    const c = this.#conns.get(front);
    if (!c) return;
    this.#conns.delete(front);
    this.dom.evtchn.close(c.port);
    c.map.unmap();
  }
}
