// The frontend role of the ring echo, the smallest complete use of the hypervisor layer: it owns a
// one-page ring.h ring, grants it and an unbound event channel to the backend, and keeps requests
// outstanding. `vtpm ring-demo`, the ring tests and `npm run bench -- ring` use it (docs/protocols/ring.md).
//
// Echo protocol: request slot {id u32, op u32, value u32, pad}; response {id u32, status u32,
// value+1 u32, pad}. 16-byte slots, so a one-page ring has 128 of them.
//
// Waiting for responses: with a poll window (src/xen/poll.ts) the frontend masks its port and watches
// rsp_prod for up to the window before it sleeps on the event channel, so a backend that answers
// within microseconds costs neither side a wake-up (docs/protocols/event-channels.md).
import type { Domain } from './domain.js';
import { FrontRing, SharedRing } from './ring.js';
import { PollWindow, spinUntil } from './poll.js';

export const ECHO_SLOT = 16;
export const ECHO_OP = 1;

/** What a frontend hands its backend (in a real driver: ring-ref and event-channel in xenstore). */
export interface RingOffer {
  frontDomid: number;
  refs: number[];
  port: number;
}

export interface EchoFrontendOptions {
  /** Poll window in µs (default VTPM_POLL_US, 50; 0: always sleep on the event channel). */
  pollUs?: number;
  /** When polling stands down (default: CPU pressure, src/xen/poll.ts cpuContended). */
  contended?: () => boolean;
}

export class EchoFrontend {
  readonly dom: Domain;
  readonly ring: FrontRing;
  readonly gfn: number;
  readonly ref: number;
  readonly port: number;
  readonly #waiters = new Map<number, (value: number) => void>();
  readonly #poll: PollWindow;
  #nextId = 1;
  /** When the current wait for a response began (ms, performance.now()); -1: not waiting. */
  #waitingSince = -1;
  /** Whether our port is masked because we poll the ring (left masked after a poll that emptied it). */
  #masked = false;

  constructor(dom: Domain, backDomid: number, opts: EchoFrontendOptions = {}) {
    this.dom = dom;
    this.#poll = new PollWindow(opts.pollUs, opts.contended);
    this.gfn = dom.allocFrames(1);
    const page = dom.frames(this.gfn);
    const sring = new SharedRing(page.buffer as ArrayBuffer, ECHO_SLOT, page.byteOffset, page.byteLength);
    sring.init();
    this.ring = new FrontRing(sring);
    this.ref = dom.grants.grantAccess(backDomid, this.gfn);
    this.port = dom.evtchn.allocUnbound(backDomid);
    dom.evtchn.on(this.port, () => this.#responses());
  }

  offer(): RingOffer {
    return { frontDomid: this.dom.domid, refs: [this.ref], port: this.port };
  }

  /** Queue one echo request; publish it now unless `batch` (then call flush()). */
  request(value: number, batch = false): Promise<number> {
    const id = this.#nextId++ >>> 0;
    const off = this.ring.nextRequestSlot();
    const v = this.ring.sring.view;
    v.setUint32(off, id, true);
    v.setUint32(off + 4, ECHO_OP, true);
    v.setUint32(off + 8, value >>> 0, true);
    this.ring.produceRequest();
    const p = new Promise<number>((resolve) => this.#waiters.set(id, resolve));
    if (!batch) this.flush();
    return p;
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then wait busy for the first response if polling pays. */
  flush(): void {
    const budget = this.#waiters.size > 0 ? this.#poll.budgetUs : 0;
    if (this.#waitingSince < 0 && this.#waiters.size > 0) this.#waitingSince = performance.now();
    // Masked before the requests are visible, so the backend's answer cannot cost a wake-up mid-poll.
    if (budget > 0) this.#mask();
    if (this.ring.pushRequestsAndCheckNotify()) this.dom.evtchn.send(this.port);
    if (budget > 0 && spinUntil(() => this.ring.unconsumedResponses() > 0, budget)) {
      this.dom.evtchn.consume(this.port);
      this.#responses();
      // Nothing outstanding: stay masked until the next flush (a late notification wakes nobody).
      if (this.#waiters.size === 0) return;
    }
    // Responses still to come arrive by notification: unmask delivers one that raced the spin.
    this.#unmask();
  }

  #mask(): void {
    if (this.#masked) return;
    this.#masked = true;
    this.dom.evtchn.mask(this.port);
  }

  #unmask(): void {
    if (!this.#masked) return;
    this.#masked = false;
    this.dom.evtchn.unmask(this.port);
  }

  #responses(): void {
    const v = this.ring.sring.view;
    if (this.#waitingSince >= 0 && this.ring.unconsumedResponses() > 0) {
      this.#poll.record((performance.now() - this.#waitingSince) * 1000);
      this.#waitingSince = -1;
    }
    do {
      while (this.ring.unconsumedResponses() > 0) {
        const off = this.ring.responseSlot();
        const id = v.getUint32(off, true);
        const value = v.getUint32(off + 8, true);
        this.ring.consumeResponse();
        const w = this.#waiters.get(id);
        this.#waiters.delete(id);
        w?.(value);
      }
    } while (this.ring.finalCheckForResponses());
    if (this.#waiters.size > 0) this.#waitingSince = performance.now();
  }
}
