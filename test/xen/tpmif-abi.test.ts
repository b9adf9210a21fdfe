// The tpmif ABI codecs (src/xen/tpmif.ts), byte for byte against docs/protocols/tpmif.md. The real
// peers (RingFront against RingChannel, V2Front against V2Channel) are exercised in test/backend.
import { describe, expect, it } from 'vitest';
import {
  decodeRingRequest,
  decodeRingRequestAt,
  decodeRingResponse,
  decodeV2Header,
  encodeRingRequest,
  encodeRingResponse,
  encodeV2Request,
  encodeV2ResponseLength,
  RING_OP_CANCEL,
  RING_OP_COMMAND,
  RING_SLOT,
  setV2State,
  TPMIF_STATE_SUBMIT,
  v2State,
} from '../../src/xen/tpmif.js';

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

function slot(): { bytes: Uint8Array; view: DataView } {
  // 0xff everywhere first, so a field the encoder forgets shows up.
  const bytes = new Uint8Array(RING_SLOT * 2).fill(0xff);
  return { bytes, view: new DataView(bytes.buffer) };
}

describe('tpmif ring slots', () => {
  it('encodes a command request at its slot offset: id, op, locality, nr_segments, zero pad, length, 12 grefs', () => {
    const { bytes, view } = slot();
    encodeRingRequest(view, RING_SLOT, { op: RING_OP_COMMAND, id: 0x0102030405060708n, locality: 3, length: 0x1234, grefs: [0x11, 0x22] });
    expect(hex(bytes.subarray(0, RING_SLOT))).toBe('ff'.repeat(RING_SLOT));
    expect(hex(bytes.subarray(RING_SLOT))).toBe(
      '0807060504030201' + '00' + '03' + '02' + '00' + '34120000' + '11000000' + '22000000' + '00000000'.repeat(10),
    );
    const back = decodeRingRequest(bytes.subarray(RING_SLOT));
    expect(back).toMatchObject({ id: 0x0102030405060708n, op: RING_OP_COMMAND, locality: 3, nrSegments: 2, length: 0x1234, grefs: [0x11, 0x22] });
  });

  it('decodes a slot in place in a scratch of several (the backend\'s one look), a command without a cancel id', () => {
    const { bytes, view } = slot();
    encodeRingRequest(view, 0, { op: RING_OP_CANCEL, id: 9n, arg: 7n });
    encodeRingRequest(view, RING_SLOT, { op: RING_OP_COMMAND, id: 10n, locality: 1, length: 12, grefs: [0x11, 0x22] });
    expect(hex(bytes.subarray(RING_SLOT, RING_SLOT + 24))).toBe('0a00000000000000' + '00' + '01' + '02' + '00' + '0c000000' + '11000000' + '22000000');
    expect(decodeRingRequestAt(view, 0)).toMatchObject({ id: 9n, op: RING_OP_CANCEL, grefs: [], cancelId: 7n });
    // The grefs 0x11, 0x22 read as a u64 would be 0x2200000011: only a cancel names an id there.
    expect(decodeRingRequestAt(view, RING_SLOT)).toEqual({ id: 10n, op: RING_OP_COMMAND, locality: 1, nrSegments: 2, length: 12, grefs: [0x11, 0x22], cancelId: 0n });
  });

  it('encodes a cancel with the id to cancel as a u64 where the grefs would be', () => {
    const { bytes, view } = slot();
    encodeRingRequest(view, 0, { op: RING_OP_CANCEL, id: 9n, arg: 7n });
    expect(hex(bytes.subarray(0, 24))).toBe('0900000000000000' + '01' + '00' + '00' + '00' + '00000000' + '0700000000000000');
    const back = decodeRingRequest(bytes.subarray(0, RING_SLOT));
    expect(back).toMatchObject({ id: 9n, op: RING_OP_CANCEL, nrSegments: 0, length: 0, grefs: [], cancelId: 7n });
  });

  it('refuses a command naming no data page or more than 12', () => {
    const { view } = slot();
    expect(() => encodeRingRequest(view, 0, { op: RING_OP_COMMAND, id: 1n, locality: 0, length: 1, grefs: [] })).toThrow(RangeError);
    expect(() => encodeRingRequest(view, 0, { op: RING_OP_COMMAND, id: 1n, locality: 0, length: 1, grefs: new Array<number>(13).fill(1) })).toThrow(RangeError);
  });

  it('encodes and decodes a response: id u64, status u32, length u32', () => {
    const { bytes, view } = slot();
    encodeRingResponse(view, RING_SLOT, { id: 5n, status: 3, length: 0x0a0b });
    expect(hex(bytes.subarray(RING_SLOT, RING_SLOT + 16))).toBe('0500000000000000' + '03000000' + '0b0a0000');
    expect(decodeRingResponse(view, RING_SLOT)).toEqual({ id: 5n, status: 3, length: 0x0a0b });
  });
});

describe('tpmif v2 page header', () => {
  it('writes length and locality, leaves nr_extra_pages, and orders the state byte separately', () => {
    const page = new Uint8Array(new SharedArrayBuffer(4096));
    page[7] = 0;
    encodeV2Request(page, 0x0c, 2);
    expect(hex(page.subarray(0, 8))).toBe('0c000000' + '00' + '02' + '0000');
    setV2State(page, TPMIF_STATE_SUBMIT);
    expect(hex(page.subarray(0, 8))).toBe('0c000000' + '01' + '02' + '0000');
    expect(v2State(page)).toBe(TPMIF_STATE_SUBMIT);
    encodeV2ResponseLength(page, 0x0102);
    page[7] = 4;
    expect(decodeV2Header(page)).toEqual({ length: 0x0102, locality: 2, nrExtraPages: 4 });
  });
});
