// The log helper for guest strings: whatever a guest writes, a quoted field is one run of printable
// ASCII that ends where its closing quote says, and an escaped line is still one line.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { QUOTE_MAX, escapeLogLine, quoteGuest } from '../../src/util/log-escape.js';

describe('log escaping', () => {
  it('quotes any guest string as printable ASCII, escaping quotes, backslashes and controls, clipped', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ unit: 'binary', maxLength: 300 }), fc.uint8Array({ maxLength: 300 })), (s) => {
        const q = quoteGuest(s);
        const m = /^"((?:[\x20-\x21\x23-\x5b\x5d-\x7e]|\\["\\nrt]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4})*)"(\.\.\.\(\+(\d+) chars\))?$/.exec(q);
        expect(m).not.toBeNull();
        const len = typeof s === 'string' ? s.length : s.length;
        expect(m![3] === undefined ? 0 : Number(m![3])).toBe(Math.max(0, len - QUOTE_MAX));
      }),
      { numRuns: 2000, seed: 15 },
    );
  });

  it('shows the bytes of a forged line escaped', () => {
    expect(quoteGuest('7\nvtpm-backend: ready\x1b[2J"\\\u202e')).toBe('"7\\nvtpm-backend: ready\\x1b[2J\\"\\\\\\u202e"');
    expect(quoteGuest(Buffer.from([0x31, 0x00, 0xff]))).toBe('"1\\x00\\xff"');
  });

  it('keeps an escaped line one line, without control or bidi characters, printable text untouched', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 300 }), (s) => {
        const l = escapeLogLine(s);
        expect(l).not.toMatch(/[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/);
      }),
      { numRuns: 2000, seed: 15 },
    );
    expect(escapeLogLine('dom7: cut off: ring-ref "ü"\r\nforged')).toBe('dom7: cut off: ring-ref "ü"\\r\\nforged');
  });
});
