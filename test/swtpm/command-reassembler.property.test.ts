// The data-port receiver as a pure parser: however a byte stream is cut into reads, it yields the
// same commands and rejections, and it never holds more than one command's bytes.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CommandReceiver, type DataFrame } from '../../src/swtpm/command-reassembler.js';

const MAX = 64;

/** One frame on the wire: a good command (size 10..MAX) or an oversize header with its body. */
const wireFrame = fc.oneof(
  fc.integer({ min: 10, max: MAX }).chain((n) =>
    fc.uint8Array({ minLength: n - 6, maxLength: n - 6 }).map((body) => frame(0x8001, n, body)),
  ),
  fc.integer({ min: MAX + 1, max: 3 * MAX }).chain((n) =>
    fc.uint8Array({ minLength: n - 6, maxLength: n - 6 }).map((body) => frame(0x8002, n, body)),
  ),
);

function frame(tag: number, size: number, body: Uint8Array): Uint8Array {
  const b = new Uint8Array(6 + body.length);
  const v = new DataView(b.buffer);
  v.setUint16(0, tag);
  v.setUint32(2, size);
  b.set(body, 6);
  return b;
}

function drain(rx: CommandReceiver, out: DataFrame[]): void {
  for (let f = rx.next(); f !== null; f = rx.next()) out.push(f);
}

/** Cuts bytes at the given (sorted, deduplicated) offsets. */
function cut(bytes: Uint8Array, at: number[]): Uint8Array[] {
  const points = [...new Set(at.map((x) => x % (bytes.length + 1)))].sort((a, b) => a - b);
  const parts: Uint8Array[] = [];
  let prev = 0;
  for (const p of [...points, bytes.length]) {
    parts.push(bytes.subarray(prev, p));
    prev = p;
  }
  return parts;
}

describe('CommandReceiver', () => {
  it('yields the same frames however the stream is split into reads', () => {
    fc.assert(
      fc.property(fc.array(wireFrame, { minLength: 1, maxLength: 6 }), fc.array(fc.nat(), { maxLength: 12 }), (frames, at) => {
        const stream = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
        let off = 0;
        for (const f of frames) stream.set(f, (off += f.length) - f.length);

        const whole: DataFrame[] = [];
        const a = new CommandReceiver(MAX);
        a.push(stream);
        drain(a, whole);

        const pieces: DataFrame[] = [];
        const b = new CommandReceiver(MAX);
        for (const part of cut(stream, at)) {
          b.push(part);
          drain(b, pieces);
          expect(b.partial).toBeLessThanOrEqual(3 * MAX);
        }
        expect(pieces).toEqual(whole);
        expect(b.partial).toBe(0);
        // Exactly one frame per wire frame: commands byte-exact, oversize ones reported by size.
        expect(whole.length).toBe(frames.length);
        whole.forEach((f, i) => {
          const size = new DataView(frames[i]!.buffer).getUint32(2);
          if (size <= MAX) expect(f).toEqual({ kind: 'command', bytes: frames[i] });
          else expect(f).toEqual({ kind: 'too-large', size, tag: 0x8002 });
        });
      }),
      { numRuns: 300 },
    );
  });

  it('a commandSize below the header kills the stream: nothing after it is parsed', () => {
    const rx = new CommandReceiver(MAX);
    rx.push(Uint8Array.from([0x80, 0x01, 0, 0, 0, 9, 0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b]));
    expect(rx.next()).toEqual({ kind: 'too-small', size: 9, tag: 0x8001 });
    expect(rx.next()).toBeNull();
    expect(rx.dead).toBe(true);
    // resync() drops what was held: the next bytes start a new command.
    rx.resync();
    rx.push(Uint8Array.from([0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b]));
    expect(rx.next()).toEqual({ kind: 'command', bytes: Uint8Array.from([0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b]) });
  });

  it('checks the size before allocating: a 4 GiB claim costs nothing and is skipped as it streams', () => {
    const rx = new CommandReceiver();
    rx.push(Uint8Array.from([0x80, 0x01, 0xff, 0xff, 0xff, 0xff]));
    expect(rx.next()).toEqual({ kind: 'too-large', size: 0xffffffff, tag: 0x8001 });
    rx.push(new Uint8Array(1 << 16));
    expect(rx.next()).toBeNull();
    expect(rx.partial).toBe(0xffffffff - 6 - (1 << 16));
  });
});
