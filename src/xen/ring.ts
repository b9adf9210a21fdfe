// Xen's generic shared ring (io/ring.h; docs/protocols/ring.md), kept close to the macros so anyone who knows Xen
// can read it: a 64-byte header (req_prod, req_event, rsp_prod, rsp_event) then power-of-two slots,
// free-running u32 indices, notify only when the peer's event index lies in (old, new], and a final
// check before idling. Indices go through Atomics, which are sequentially consistent and so give the
// wmb/mb/rmb of ring.h; slot contents are plain stores made before the index is published.

export const RING_HEADER_SIZE = 64;
const REQ_PROD = 0;
const REQ_EVENT = 1;
const RSP_PROD = 2;
const RSP_EVENT = 3;

/** __RING_SIZE: slots that fit after the header, rounded down to a power of two. */
export function ringSize(areaBytes: number, slotBytes: number): number {
  const n = Math.floor((areaBytes - RING_HEADER_SIZE) / slotBytes);
  if (n < 1) throw new RangeError(`ring of ${areaBytes} bytes cannot hold a ${slotBytes}-byte slot`);
  return 2 ** Math.floor(Math.log2(n));
}

const u32 = (x: number): number => x >>> 0;

export class RingError extends Error {
  constructor(
    readonly code: 'EACCES' | 'EINVAL',
    message: string,
  ) {
    super(message);
    this.name = 'RingError';
  }
}

/** The shared page(s): header indices and slots. Both ends construct one over the same bytes. */
export class SharedRing {
  readonly idx: Uint32Array;
  readonly view: DataView;
  readonly bytes: Uint8Array;
  readonly size: number;
  readonly slotBytes: number;

  constructor(buffer: ArrayBuffer, slotBytes: number, byteOffset = 0, byteLength = buffer.byteLength - byteOffset) {
    this.idx = new Uint32Array(buffer, byteOffset, 4);
    this.view = new DataView(buffer, byteOffset, byteLength);
    this.bytes = new Uint8Array(buffer, byteOffset, byteLength);
    this.slotBytes = slotBytes;
    this.size = ringSize(byteLength, slotBytes);
  }

  /** SHARED_RING_INIT (frontend only): producers 0, both event indices 1, padding zeroed. */
  init(): void {
    this.bytes.fill(0, 16, RING_HEADER_SIZE);
    Atomics.store(this.idx, REQ_PROD, 0);
    Atomics.store(this.idx, RSP_PROD, 0);
    Atomics.store(this.idx, REQ_EVENT, 1);
    Atomics.store(this.idx, RSP_EVENT, 1);
  }

  /** Byte offset (in `view`/`bytes`) of the slot for free-running index i. */
  slot(i: number): number {
    return RING_HEADER_SIZE + (i & (this.size - 1)) * this.slotBytes;
  }

  get reqProd(): number {
    return Atomics.load(this.idx, REQ_PROD);
  }
  get rspProd(): number {
    return Atomics.load(this.idx, RSP_PROD);
  }
  get reqEvent(): number {
    return Atomics.load(this.idx, REQ_EVENT);
  }
  get rspEvent(): number {
    return Atomics.load(this.idx, RSP_EVENT);
  }
}

/** The frontend's private state (struct *_front_ring) and its macros. */
export class FrontRing {
  reqProdPvt = 0;
  rspCons = 0;
  readonly sring: SharedRing;

  /** FRONT_RING_INIT; call sring.init() first when this side owns a new page. */
  constructor(sring: SharedRing) {
    this.sring = sring;
  }

  get size(): number {
    return this.sring.size;
  }

  /** RING_FREE_REQUESTS */
  freeRequests(): number {
    return this.size - u32(this.reqProdPvt - this.rspCons);
  }

  /** RING_FULL */
  full(): boolean {
    return this.freeRequests() === 0;
  }

  /** RING_GET_REQUEST for the next free slot: byte offset to fill, then call produceRequest(). */
  nextRequestSlot(): number {
    if (this.full()) throw new RingError('EINVAL', 'ring full: no free request slot');
    return this.sring.slot(this.reqProdPvt);
  }

  produceRequest(): void {
    this.reqProdPvt = u32(this.reqProdPvt + 1);
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish, and say whether the backend asked to be woken. */
  pushRequestsAndCheckNotify(): boolean {
    const s = this.sring;
    const old = s.reqProd;
    const nw = this.reqProdPvt;
    Atomics.store(s.idx, REQ_PROD, nw);
    return u32(nw - s.reqEvent) < u32(nw - old);
  }

  /** RING_HAS_UNCONSUMED_RESPONSES (a count). */
  unconsumedResponses(): number {
    return u32(this.sring.rspProd - this.rspCons);
  }

  /** RING_RESPONSE_PROD_OVERFLOW: a backend claiming more responses than requests outstanding. */
  responseProdOverflow(prod: number): boolean {
    return u32(prod - this.rspCons) > this.size;
  }

  /** Byte offset of the response at rspCons; call consumeResponse() after reading it. */
  responseSlot(): number {
    return this.sring.slot(this.rspCons);
  }

  consumeResponse(): void {
    this.rspCons = u32(this.rspCons + 1);
  }

  /** RING_FINAL_CHECK_FOR_RESPONSES: arm rsp_event, then look once more. True = more work. */
  finalCheckForResponses(): boolean {
    if (this.unconsumedResponses() > 0) return true;
    Atomics.store(this.sring.idx, RSP_EVENT, u32(this.rspCons + 1));
    return this.unconsumedResponses() > 0;
  }
}

/** The backend's private state (struct *_back_ring), its macros and xen-blkback's defences. */
export class BackRing {
  rspProdPvt = 0;
  reqCons = 0;
  readonly sring: SharedRing;

  /** BACK_RING_INIT: the backend never initialises the shared page itself. */
  constructor(sring: SharedRing) {
    this.sring = sring;
  }

  get size(): number {
    return this.sring.size;
  }

  /**
   * RING_HAS_UNCONSUMED_REQUESTS: clamped to the slots whose responses we have produced, so a bogus
   * req_prod cannot make us read slots we still own.
   */
  unconsumedRequests(): number {
    const req = u32(this.sring.reqProd - this.reqCons);
    const rsp = this.size - u32(this.reqCons - this.rspProdPvt);
    return Math.min(req, rsp);
  }

  /** RING_REQUEST_CONS_OVERFLOW: consuming `cons` would overrun slots not yet answered. */
  requestConsOverflow(cons: number): boolean {
    return u32(cons - this.rspProdPvt) >= this.size;
  }

  /** RING_REQUEST_PROD_OVERFLOW: the frontend claims more requests than the ring holds. */
  requestProdOverflow(prod: number): boolean {
    return u32(prod - this.rspProdPvt) > this.size;
  }

  /**
   * Take every available request as a private copy (RING_COPY_REQUEST), with xen-blkback's checks:
   * snapshot req_prod once; a req_prod past the ring size rejects the ring (the caller must stop
   * serving that frontend); stop at RING_REQUEST_CONS_OVERFLOW. Callers validate only the copies.
   */
  takeRequests(max = Infinity): Uint8Array[] {
    const s = this.sring;
    const rp = this.#snapshotReqProd();
    const out: Uint8Array[] = [];
    let rc = this.reqCons;
    while (rc !== rp && out.length < max) {
      if (this.requestConsOverflow(rc)) break;
      const off = s.slot(rc);
      out.push(s.bytes.slice(off, off + s.slotBytes));
      rc = u32(rc + 1);
    }
    this.reqCons = rc;
    return out;
  }

  /**
   * takeRequests without allocating: copy up to scratch.length / slotBytes requests back to back into
   * `scratch` and return how many. Same checks; for backends on a hot path.
   */
  takeRequestsInto(scratch: Uint8Array): number {
    const s = this.sring;
    const rp = this.#snapshotReqProd();
    const max = Math.floor(scratch.length / s.slotBytes);
    let n = 0;
    let rc = this.reqCons;
    while (rc !== rp && n < max) {
      if (this.requestConsOverflow(rc)) break;
      const off = s.slot(rc);
      scratch.set(s.bytes.subarray(off, off + s.slotBytes), n * s.slotBytes);
      n++;
      rc = u32(rc + 1);
    }
    this.reqCons = rc;
    return n;
  }

  /**
   * Read req_prod once (the rmb point) and reject the ring if it claims more than it can hold, or if it
   * went back behind what we already consumed: req_cons would then chase it round the ring and take
   * stale slots (old requests, our own responses) as new requests.
   */
  #snapshotReqProd(): number {
    const rp = this.sring.reqProd;
    if (this.requestProdOverflow(rp)) {
      throw new RingError(
        'EACCES',
        `bogus ring requests: req_prod ${rp} is ${u32(rp - this.rspProdPvt)} past rsp_prod_pvt ${this.rspProdPvt} (ring size ${this.size})`,
      );
    }
    if (u32(rp - this.reqCons) > this.size) {
      throw new RingError('EACCES', `bogus ring requests: req_prod ${rp} moved back behind req_cons ${this.reqCons}`);
    }
    return rp;
  }

  /** RING_GET_RESPONSE for the next response slot; fill it, then produceResponse(). */
  nextResponseSlot(): number {
    return this.sring.slot(this.rspProdPvt);
  }

  produceResponse(): void {
    this.rspProdPvt = u32(this.rspProdPvt + 1);
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
  pushResponsesAndCheckNotify(): boolean {
    const s = this.sring;
    const old = s.rspProd;
    const nw = this.rspProdPvt;
    Atomics.store(s.idx, RSP_PROD, nw);
    return u32(nw - s.rspEvent) < u32(nw - old);
  }

  /** RING_FINAL_CHECK_FOR_REQUESTS: arm req_event, then look once more. True = more work. */
  finalCheckForRequests(): boolean {
    if (this.unconsumedRequests() > 0) return true;
    Atomics.store(this.sring.idx, REQ_EVENT, u32(this.reqCons + 1));
    return this.unconsumedRequests() > 0;
  }
}
