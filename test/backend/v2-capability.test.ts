// What a v2 device's GetCapability(TPM_PROPERTIES) answer promises: the backend lowers
// TPM_PT_MAX_COMMAND_SIZE (0x11e) and TPM_PT_MAX_RESPONSE_SIZE (0x11f) to what the page carries,
// leaves every other property and every other command's answer alone, and never writes into the
// response it was given (a copy carries the change).
import { describe, expect, it } from 'vitest';
import { clampCapability } from '../../src/backend/v2-channel.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';

const getCap = Buffer.from('80010000001600000' + '17a' + '00000006' + '0000011e' + '00000002', 'hex');
// Answer: tag 8001, size, rc 0, moreData 0, capability 6, count 3, (0x11d, 0x400) (0x11e, 0x1000) (0x11f, 0x1000).
const answer = (): Buffer =>
  Buffer.from('8001' + '0000002b' + '00000000' + '00' + '00000006' + '00000003' + '0000011d00000400' + '0000011e00001000' + '0000011f00001000', 'hex');

describe('clampCapability (v2 backend)', () => {
  it('lowers MAX_COMMAND_SIZE and MAX_RESPONSE_SIZE to 4088 in a copy; other properties unchanged', () => {
    const rsp = answer();
    const out = Buffer.from(clampCapability(getCap, rsp, 4088));
    // Bytes 19..: (0x11d, 0x400) unchanged, (0x11e, 0xff8), (0x11f, 0xff8).
    expect(out.toString('hex')).toBe('8001' + '0000002b' + '00000000' + '00' + '00000006' + '00000003' + '0000011d00000400' + '0000011e00000ff8' + '0000011f00000ff8');
    expect(rsp.toString('hex')).toBe(answer().toString('hex'));
  });

  it('passes other commands, error answers, other capabilities and short answers through untouched', () => {
    const rsp = answer();
    const getRandom = tpm2.getRandom(8);
    expect(clampCapability(getRandom, rsp, 4088)).toBe(rsp);
    const err = Buffer.from('80010000000a00000101', 'hex');
    expect(clampCapability(getCap, err, 4088)).toBe(err);
    const handles = answer();
    handles.writeUInt32BE(1, 11); // TPM_CAP_HANDLES
    expect(clampCapability(getCap, handles, 4088)).toBe(handles);
    // A count larger than the bytes present: only whole entries are looked at.
    const lying = answer().subarray(0, 31);
    lying.writeUInt32BE(1000, 15);
    expect(Buffer.from(clampCapability(getCap, lying, 4088)).toString('hex')).toBe(lying.toString('hex'));
  });
});
