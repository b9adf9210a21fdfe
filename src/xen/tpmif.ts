// The two TPM transports between a guest and its backend, as shared-memory ABIs.
//
// `v2`: Xen's io/tpmif.h shared page, byte-compatible with Linux xen-tpmfront and mini-os:
//   length u32 @0, state u8 @4, locality u8 @5, pad u8 @6, nr_extra_pages u8 @7,
//   extra_pages u32[n] @8, data @8+4n (4088 bytes with n = 0). Frontend writes only SUBMIT/CANCEL,
//   backend only IDLE/FINISH.
//
// `ring`: our multi-request transport, a ring.h ring (64-byte slots) of
//   request  {id u64 @0, op u8 @8, locality u8 @9, nr_segments u8 @10, pad u8 @11, length u32 @12,
//             gref u32[12] @16}
//   response {id u64 @0, status u32 @8, length u32 @12}
// The command is in the granted data pages named by the request; the backend writes the response into
// the same pages, so a request grants room for its response (at least one page). Several requests may
// be outstanding; they run in order. A cancel request (op 1) names the id to cancel as a u64 where
// the grefs would be, and is itself answered with status OK. A suspend notice (op 2, no segments)
// says the frontend is about to write Closing to suspend: the backend answers everything accepted
// before it, makes the vTPM's state durable, sends its Closing and then answers the notice (status
// OK), which the frontend takes as that Closing; then it unmaps the ring.

export const TPMIF_STATE_IDLE = 0;
export const TPMIF_STATE_SUBMIT = 1;
export const TPMIF_STATE_FINISH = 2;
export const TPMIF_STATE_CANCEL = 3;

export const V2_LENGTH = 0;
export const V2_STATE = 4;
export const V2_LOCALITY = 5;
export const V2_NR_EXTRA = 7;
export const V2_HEADER = 8;

/** Offset of the command/response bytes: 8 + 4·nr_extra_pages (the real drivers, not the header's table). */
export function v2DataOffset(nrExtraPages: number): number {
  return V2_HEADER + 4 * nrExtraPages;
}

/** 4096 − 8: the largest command or response a one-page v2 device carries. */
export const V2_MAX_DATA = 4096 - V2_HEADER;

export const RING_SLOT = 64;
export const RING_MAX_SEGMENTS = 12;

export const RING_OP_COMMAND = 0;
export const RING_OP_CANCEL = 1;
export const RING_OP_SUSPEND = 2;

export const RING_STATUS_OK = 0;
/** The request itself was malformed (bad op, length, segments or grant); nothing ran. */
export const RING_STATUS_EINVAL = 1;
/** The vTPM failed (crashed, failure mode); the response carries a TPM failure code. */
export const RING_STATUS_EIO = 2;
/** Cancelled before or while running; the response carries TPM_RC_CANCELED / TPM_FAIL. */
export const RING_STATUS_CANCELED = 3;

export const REQ_ID = 0;
export const REQ_OP = 8;
export const REQ_LOCALITY = 9;
export const REQ_NR_SEGMENTS = 10;
export const REQ_PAD = 11;
export const REQ_LENGTH = 12;
export const REQ_GREFS = 16;

export const RSP_ID = 0;
export const RSP_STATUS = 8;
export const RSP_LENGTH = 12;

/** The private copy of one ring request, decoded (validation is the backend's). */
export interface RingRequest {
  id: bigint;
  op: number;
  locality: number;
  nrSegments: number;
  length: number;
  grefs: number[];
  /** For a cancel: the id of the request to cancel (u64 at the grefs' place). */
  cancelId: bigint;
}

export function decodeRingRequest(b: Uint8Array): RingRequest {
  return decodeRingRequestAt(new DataView(b.buffer, b.byteOffset, b.byteLength), 0);
}

/**
 * Decode the slot at `off` of a private copy (a backend's scratch, read through one DataView it keeps).
 * Only an op-1 request has a cancel id: a command's grefs are not read a second time as a u64.
 */
export function decodeRingRequestAt(dv: DataView, off: number): RingRequest {
  const nrSegments = dv.getUint8(off + REQ_NR_SEGMENTS);
  const op = dv.getUint8(off + REQ_OP);
  const grefs: number[] = [];
  for (let i = 0; i < Math.min(nrSegments, RING_MAX_SEGMENTS); i++) grefs.push(dv.getUint32(off + REQ_GREFS + 4 * i, true));
  return {
    id: dv.getBigUint64(off + REQ_ID, true),
    op,
    locality: dv.getUint8(off + REQ_LOCALITY),
    nrSegments,
    length: dv.getUint32(off + REQ_LENGTH, true),
    grefs,
    cancelId: op === RING_OP_CANCEL ? dv.getBigUint64(off + REQ_GREFS, true) : 0n,
  };
}

/** What a frontend puts in a slot: a command naming its data pages, or a control request (no segments). */
export type RingRequestOut =
  | { op: typeof RING_OP_COMMAND; id: bigint; locality: number; length: number; grefs: readonly number[] }
  | { op: typeof RING_OP_CANCEL | typeof RING_OP_SUSPEND; id: bigint; arg: bigint };

/** Write one request slot at `off` of the ring page: every field, pad zeroed, unused grefs zeroed. */
export function encodeRingRequest(v: DataView, off: number, r: RingRequestOut): void {
  v.setBigUint64(off + REQ_ID, r.id, true);
  v.setUint8(off + REQ_OP, r.op);
  v.setUint8(off + REQ_PAD, 0);
  if (r.op === RING_OP_COMMAND) {
    if (r.grefs.length < 1 || r.grefs.length > RING_MAX_SEGMENTS) throw new RangeError(`a command names 1..${RING_MAX_SEGMENTS} grefs`);
    v.setUint8(off + REQ_LOCALITY, r.locality);
    v.setUint8(off + REQ_NR_SEGMENTS, r.grefs.length);
    v.setUint32(off + REQ_LENGTH, r.length, true);
    for (let i = 0; i < RING_MAX_SEGMENTS; i++) v.setUint32(off + REQ_GREFS + 4 * i, r.grefs[i] ?? 0, true);
  } else {
    v.setUint8(off + REQ_LOCALITY, 0);
    v.setUint8(off + REQ_NR_SEGMENTS, 0);
    v.setUint32(off + REQ_LENGTH, 0, true);
    v.setBigUint64(off + REQ_GREFS, r.arg, true);
  }
}

export interface RingResponse {
  id: bigint;
  status: number;
  length: number;
}

export function encodeRingResponse(v: DataView, off: number, r: RingResponse): void {
  v.setBigUint64(off + RSP_ID, r.id, true);
  v.setUint32(off + RSP_STATUS, r.status, true);
  v.setUint32(off + RSP_LENGTH, r.length, true);
}

/** Read one response slot (validation is the frontend's: the length is the backend's claim). */
export function decodeRingResponse(v: DataView, off: number): RingResponse {
  return {
    id: v.getBigUint64(off + RSP_ID, true),
    status: v.getUint32(off + RSP_STATUS, true),
    length: v.getUint32(off + RSP_LENGTH, true),
  };
}

/** The v2 page's header fields other than state, read once into a private copy. */
export interface V2Header {
  length: number;
  locality: number;
  nrExtraPages: number;
}

function pageView(page: Uint8Array): DataView {
  return new DataView(page.buffer, page.byteOffset, page.byteLength);
}

export function decodeV2Header(page: Uint8Array): V2Header {
  return { length: pageView(page).getUint32(V2_LENGTH, true), locality: page[V2_LOCALITY]!, nrExtraPages: page[V2_NR_EXTRA]! };
}

/** Frontend side before SUBMIT: the command's length and locality (nr_extra_pages stays as granted). */
export function encodeV2Request(page: Uint8Array, length: number, locality: number): void {
  pageView(page).setUint32(V2_LENGTH, length, true);
  page[V2_LOCALITY] = locality;
}

/** Backend side before FINISH: the response's length. */
export function encodeV2ResponseLength(page: Uint8Array, length: number): void {
  pageView(page).setUint32(V2_LENGTH, length, true);
}

/** The state byte, read and written atomically: it orders everything else on the page. */
export function v2State(page: Uint8Array): number {
  return Atomics.load(page, V2_STATE);
}

export function setV2State(page: Uint8Array, state: number): void {
  Atomics.store(page, V2_STATE, state);
}

/** Xenstore keys of the two protocols (frontend and backend directories). */
export const XS_FEATURE_V2 = 'feature-protocol-v2';
export const XS_FEATURE_RING = 'feature-multi-request-ring';
export const XS_RING_PAGE_ORDER = 'ring-page-order';
