import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  XS_ERRORS,
  XsReceiver,
  XsType,
  XsWireError,
  encodeMessage,
  encodeStrings,
  encodeWrite,
  splitStrings,
  splitWrite,
  type XsMessage,
} from '../../src/xenstore/wire.js';
import { hex } from './helpers.js';

describe('xs_wire codec', () => {
  it('encodes a READ request as a 16-byte little-endian header plus "path\\0"', () => {
    const frame = encodeMessage(XsType.READ, 7, 0, encodeStrings('/a'));
    expect(hex(frame)).toBe('02000000' + '07000000' + '00000000' + '03000000' + '2f6100');
  });

  it('encodes a WRITE payload as path, NUL, raw value without terminator', () => {
    const frame = encodeMessage(XsType.WRITE, 0x01020304, 9, encodeWrite('/k', 'v1'));
    expect(hex(frame)).toBe('0b000000' + '04030201' + '09000000' + '05000000' + '2f6b00' + '7631');
  });

  it('encodes a WATCH_EVENT with req_id and tx_id zero', () => {
    const frame = encodeMessage(XsType.WATCH_EVENT, 0, 0, encodeStrings('/a', 'tok'));
    expect(hex(frame)).toBe('0f000000' + '00000000' + '00000000' + '07000000' + '2f6100' + '746f6b00');
  });

  it('numbers types and errors as xs_wire.h', () => {
    expect([XsType.DIRECTORY, XsType.WATCH_EVENT, XsType.ERROR, XsType.RESET_WATCHES, XsType.DIRECTORY_PART]).toEqual([1, 15, 16, 21, 22]);
    expect(XS_ERRORS.indexOf('EAGAIN')).toBe(12);
    expect(XS_ERRORS[0]).toBe('EINVAL');
    expect(XS_ERRORS[15]).toBe('EPERM');
  });

  it('refuses to encode a payload over 4096 bytes', () => {
    expect(() => encodeMessage(XsType.WRITE, 1, 0, Buffer.alloc(4097))).toThrow(XsWireError);
    expect(encodeMessage(XsType.WRITE, 1, 0, Buffer.alloc(4096)).length).toBe(4112);
  });

  it('splits NUL-terminated strings and reports a missing terminator', () => {
    expect(splitStrings(Buffer.from('a\0b\0'))).toEqual(['a', 'b']);
    expect(splitStrings(Buffer.from(''))).toEqual([]);
    expect(splitStrings(Buffer.from('\0'))).toEqual(['']);
    expect(splitStrings(Buffer.from('a\0b'))).toBeUndefined();
    expect(splitWrite(Buffer.from('/p\0v\0x'))).toEqual({ path: '/p', value: Buffer.from('v\0x') });
    expect(splitWrite(Buffer.from('/p'))).toBeUndefined();
  });
});

describe('XsReceiver', () => {
  const collect = (): { rx: XsReceiver; got: XsMessage[] } => {
    const got: XsMessage[] = [];
    return { rx: new XsReceiver((m) => got.push(m)), got };
  };

  it('assembles frames delivered one byte at a time', () => {
    const { rx, got } = collect();
    const bytes = Buffer.from('0200000007000000000000000300000' + '02f6100', 'hex');
    for (const b of bytes) rx.push(Buffer.from([b]));
    expect(got).toHaveLength(1);
    expect(got[0]).toMatchObject({ type: 2, reqId: 7, txId: 0 });
    expect(got[0]!.payload.toString()).toBe('/a\0');
  });

  it('rejects a header announcing 4097 bytes before the payload arrives', () => {
    const { rx, got } = collect();
    expect(() => rx.push(Buffer.from('02000000' + '01000000' + '00000000' + '01100000', 'hex'))).toThrow(/4097 payload bytes, limit 4096/);
    expect(got).toHaveLength(0);
    // the receiver stays failed
    expect(() => rx.push(Buffer.from([0]))).toThrow(XsWireError);
  });

  it('yields the same frames however the stream is chunked (property)', () => {
    const frameArb = fc.record({
      type: fc.integer({ min: 0, max: 0xffffffff }),
      reqId: fc.integer({ min: 0, max: 0xffffffff }),
      txId: fc.integer({ min: 0, max: 0xffffffff }),
      payload: fc.uint8Array({ maxLength: 4096 }),
    });
    fc.assert(
      fc.property(fc.array(frameArb, { maxLength: 8 }), fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1 }), (frames, cuts) => {
        const stream = Buffer.concat(frames.map((f) => encodeMessage(f.type, f.reqId, f.txId, Buffer.from(f.payload))));
        const { rx, got } = collect();
        let off = 0;
        for (let i = 0; off < stream.length; i++) {
          const n = cuts[i % cuts.length]!;
          rx.push(stream.subarray(off, off + n));
          off += n;
        }
        expect(got.map((m) => ({ type: m.type, reqId: m.reqId, txId: m.txId, payload: new Uint8Array(m.payload) }))).toEqual(
          frames.map((f) => ({ ...f, payload: new Uint8Array(f.payload) })),
        );
        expect(rx.pendingBytes).toBe(0);
      }),
      { numRuns: 300 },
    );
  });

  it('never throws anything but XsWireError on arbitrary bytes (property)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        const { rx } = collect();
        try {
          rx.push(Buffer.from(bytes));
        } catch (err) {
          expect(err).toBeInstanceOf(XsWireError);
        }
      }),
      { numRuns: 2000 },
    );
  });
});
