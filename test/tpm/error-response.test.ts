// The one error builder: TPM 1.2 errors are tagged TPM_TAG_RSP_COMMAND (0xC4) whatever the request's
// tag, TPM 2.0 errors TPM_ST_NO_SESSIONS (0x8001). Its size errors are compared with libtpms' own
// answers in bad-input.test.ts.
import { describe, expect, it } from 'vitest';
import { canceledResponse, failureResponse } from '../../src/tpm/error-response.js';
import { responseCode } from '../../src/tpm/wire.js';
import { hex, unhex } from './helpers.js';

describe('error responses', () => {
  it('cancelled and failed commands: the same framing, the family code', () => {
    expect(hex(canceledResponse(unhex('8002 0000000c 0000017b 0008')))).toBe('80010000000a00000909');
    expect(hex(canceledResponse(unhex('00c2 0000000c 00000046 0008')))).toBe('00c40000000a00000009');
    expect(hex(failureResponse(unhex('8001 0000000c 0000017b 0008')))).toBe('80010000000a00000101');
    expect(hex(failureResponse(unhex('00c3 0000000c 00000046 0008')))).toBe('00c40000000a00000009');
  });

  it('a response too short to carry a code reads as -1, never as success', () => {
    expect(responseCode(unhex('8001 0000000a 0000'))).toBe(-1);
    expect(responseCode(new Uint8Array(0))).toBe(-1);
    expect(responseCode(unhex('8001 0000000a 00000000'))).toBe(0);
  });
});
