import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  FrameDecoder,
  MAX_PARAMS,
  Ord,
  Status,
  TAG_REQ,
  TAG_RSP,
  WireError,
  decodeConnect,
  decodeOpen,
  encodeConnect,
  encodeOpen,
  encodeRequest,
  encodeResponse,
  splitSharedRead,
} from '../../src/manager/wire.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

describe('Xen 3.x manager framing', () => {
  it('encodes the OPEN a Xen hotplug script writes, byte for byte', () => {
    // vtpm-impl: 00000000 01C1 00000011 01000001 01 01 <vmtype> <inst32>
    const f = encodeRequest(0, Ord.OPEN, encodeOpen({ migType: 1, startup: 1, vmType: 1, instance: 5, vmUuid: null, version: null }));
    expect(f).toEqual(hex('00000000 01c1 00000011 01000001 01 01 01 00000005'));
  });

  it('encodes CLOSE and a response with the status in place of the ordinal and the request tag echoed, as Xen', () => {
    expect(encodeRequest(0, Ord.CLOSE, hex('00000007'))).toEqual(hex('00000000 01c1 0000000e 01000002 00000007'));
    // TPM_BAD_PARAMETER (3) under tag 0x01C1: what Xen's manager answered a CLOSE of an instance not open.
    expect(encodeResponse(7, Status.BAD_PARAMETER)).toEqual(hex('00000007 01c1 0000000a 00000003'));
    expect(encodeResponse(7, Status.SUCCESS, undefined, TAG_RSP)).toEqual(hex('00000007 01c4 0000000a 00000000'));
  });

  it('numbers its statuses as Xen\'s tcg.h does', () => {
    expect(Status).toEqual({ SUCCESS: 0, AUTHFAIL: 1, BAD_PARAMETER: 3, FAIL: 9, BAD_ORDINAL: 10, RESOURCES: 21, IOERROR: 31, DECRYPT_ERROR: 33 });
  });

  it('appends uuid and TPM version to our OPEN and reads both forms back', () => {
    const p = { migType: 0, startup: 2, vmType: 2, instance: 0, vmUuid: '0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3', version: '2.0' as const };
    const b = encodeOpen(p);
    expect(b).toEqual(hex('00 02 02 00000000 0a1b2c3d4e5f4a6b8c7d8e9fa0b1c2d3 02'));
    expect(decodeOpen(b)).toEqual(p);
    expect(decodeOpen(hex('01 01 01 00000009'))).toEqual({ migType: 1, startup: 1, vmType: 1, instance: 9, vmUuid: null, version: null });
    expect(() => decodeOpen(hex('01 01'))).toThrow(WireError);
  });

  it('decodes frames split at every byte and glued together', () => {
    const a = encodeRequest(3, Ord.SAVENVM, hex('deadbeef'));
    const b = encodeRequest(4, Ord.LOADNVM);
    const d = new FrameDecoder([TAG_REQ]);
    const out = [];
    for (const byte of Buffer.concat([a, b])) out.push(...d.push(Uint8Array.of(byte)));
    expect(out.map((f) => ({ ...f, params: Buffer.from(f.params).toString('hex') }))).toEqual([
      { instance: 3, tag: TAG_REQ, code: Ord.SAVENVM, params: 'deadbeef' },
      { instance: 4, tag: TAG_REQ, code: Ord.LOADNVM, params: '' },
    ]);
    expect(d.idle).toBe(true);
  });

  it('rejects a bad tag, a size below the header and an oversized frame before allocating', () => {
    const bad = (bytes: Buffer, code: string): void => {
      const d = new FrameDecoder([TAG_REQ]);
      try {
        d.push(bytes);
        expect.unreachable();
      } catch (e) {
        expect(e).toBeInstanceOf(WireError);
        expect((e as WireError).code).toBe(code);
        expect((e as WireError).status).toBe(Status.BAD_PARAMETER);
      }
      expect(d.failed).toBe(true);
    };
    bad(hex('00000001 beef 0000000a 00000001'), 'BAD_TAG');
    bad(hex('00000001 01c1 00000009 00000001'), 'BAD_SIZE');
    const huge = Buffer.alloc(14);
    huge.writeUInt16BE(TAG_REQ, 4);
    huge.writeUInt32BE(MAX_PARAMS + 11, 6);
    bad(huge, 'TOO_LARGE');
  });

  it('CONNECT names only safe FIFO names', () => {
    const b = encodeConnect({ bind: 0xffffffff, pid: 42, name: 'be-1' });
    expect(b).toEqual(hex('ffffffff 0000002a 04 62652d31'));
    expect(decodeConnect(b)).toEqual({ bind: 0xffffffff, pid: 42, name: 'be-1' });
    expect(() => decodeConnect(Buffer.concat([hex('00000000 00000001 05'), Buffer.from('../..')]))).toThrow(WireError);
  });
});

describe('reads of a FIFO with several writers (splitSharedRead)', () => {
  const CONNECT = hex('00000000 01c1 00000016 00000100 ffffffff 0000002a 03 616263'); // CONNECT bind any, pid 42, "abc"

  it('finds whole frames after garbage and half frames in one read, with one error naming the skipped bytes', () => {
    const half = hex('00000000 01c1 0080000a 00000100'); // issue #15: a header promising 8 MiB
    const { frames, error } = splitSharedRead(Buffer.concat([CONNECT, hex('deadbeef'), half, CONNECT]), [TAG_REQ], 4082);
    expect(frames.map((f) => [f.code, Buffer.from(f.params).toString('hex')])).toEqual([
      [0x100, 'ffffffff0000002a03616263'],
      [0x100, 'ffffffff0000002a03616263'],
    ]);
    expect(error?.message).toBe('invalid tag 0x0000; 18 bytes skipped (deadbeef0000000001c10080000a0000…)');
  });

  it('drops a frame that promises more than its read holds, without taking bytes from the next read', () => {
    const short = hex('00000000 01c1 00000011 01000001 01 01 01'); // an OPEN missing its instance
    const r1 = splitSharedRead(short, [TAG_REQ], 4082);
    expect(r1.frames).toEqual([]);
    expect(r1.error?.code).toBe('TRUNCATED');
    expect(r1.error?.message).toBe('half frame: its header promises 21 bytes, the write held 17; 17 bytes skipped (0000000001c100000011010000010101…)');
    const r2 = splitSharedRead(CONNECT, [TAG_REQ], 4082);
    expect(r2).toEqual({ frames: [{ instance: 0, tag: TAG_REQ, code: 0x100, params: hex('ffffffff 0000002a 03 616263') }], error: null });
  });

  it('fuzz: any bytes give frames that lie inside the read and at most one error, never a throw', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(300), (junk, at) => {
        const read = Buffer.concat([Buffer.from(junk).subarray(0, at), CONNECT, Buffer.from(junk).subarray(at)]);
        const { frames } = splitSharedRead(read, [TAG_REQ], 4082);
        let total = 0;
        for (const f of frames) total += 14 + f.params.length;
        expect(total).toBeLessThanOrEqual(read.length);
      }),
      { numRuns: 2000 },
    );
  });
});

describe('frame decoder fuzzing', () => {
  it('any bytes in any chunking: frames or one WireError, nothing else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.array(fc.nat(40), { maxLength: 20 }), (bytes, cuts) => {
        const d = new FrameDecoder([TAG_REQ, TAG_RSP], 64);
        let off = 0;
        try {
          for (const c of [...cuts, bytes.length]) {
            d.push(bytes.subarray(off, off + c));
            off += c;
            if (off >= bytes.length) break;
          }
        } catch (e) {
          expect(e).toBeInstanceOf(WireError);
          expect(d.failed).toBe(true);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('round-trips any frame sequence under any chunking', () => {
    const frame = fc.record({
      instance: fc.nat(),
      code: fc.nat(),
      params: fc.uint8Array({ maxLength: 100 }),
    });
    fc.assert(
      fc.property(fc.array(frame, { maxLength: 8 }), fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 10 }), (frames, cuts) => {
        const wire = Buffer.concat(frames.map((f) => encodeRequest(f.instance, f.code, f.params)));
        const d = new FrameDecoder([TAG_REQ]);
        const out = [];
        let off = 0;
        for (let i = 0; off < wire.length; i++) {
          const n = cuts[i % cuts.length]!;
          out.push(...d.push(wire.subarray(off, off + n)));
          off += n;
        }
        expect(out.map((f) => ({ instance: f.instance, code: f.code, params: Buffer.from(f.params) }))).toEqual(
          frames.map((f) => ({ instance: f.instance, code: f.code, params: Buffer.from(f.params) })),
        );
        expect(d.idle).toBe(true);
      }),
      { numRuns: 500 },
    );
  });
});
