// The one error builder against libtpms' own answers: for every request tag of both families, the size
// error we make up (a command too large for the buffer) is byte for byte what libtpms answers a command
// whose size field is wrong. TPM 1.2 errors are tagged TPM_TAG_RSP_COMMAND (0xC4) whatever the request's
// tag; TPM 2.0 errors TPM_ST_NO_SESSIONS (0x8001).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import { canceledResponse, failureResponse, sizeErrorResponse } from '../../src/tpm/error-response.js';
import { responseCode } from '../../src/tpm/wire.js';
import { hex, tempStore, unhex } from './helpers.js';

describe('error responses', () => {
  const t = tempStore('errrsp');
  const host = new TpmHost();
  let t2: TpmInstance;
  let t12: TpmInstance;
  beforeAll(async () => {
    t2 = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    t12 = await host.create({ instance: 2, version: '1.2', store: t.store, startup: 'clear' });
  });
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  // A 14-byte command claiming 0x20 bytes: libtpms itself answers the size error.
  const wrongSize = (tag: string, ordinal: string): Uint8Array => unhex(`${tag} 00000020 ${ordinal} 0008`);

  it.each(['00c1', '00c2', '00c3'])('TPM 1.2, request tag %s: ours equals libtpms (00c4 ... TPM_BAD_PARAM_SIZE)', async (tag) => {
    const cmd = wrongSize(tag, '00000046'); // TPM_ORD_GetRandom
    const theirs = await t12.execute(cmd);
    expect(hex(theirs)).toBe('00c40000000a00000019');
    expect(hex(sizeErrorResponse(cmd))).toBe(hex(theirs));
  });

  it.each(['8001', '8002'])('TPM 2.0, request tag %s: ours equals libtpms (8001 ... TPM_RC_COMMAND_SIZE)', async (tag) => {
    const cmd = wrongSize(tag, '0000017b'); // TPM2_CC_GetRandom
    const theirs = await t2.execute(cmd);
    expect(hex(theirs)).toBe('80010000000a00000142');
    expect(hex(sizeErrorResponse(cmd))).toBe(hex(theirs));
  });

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
