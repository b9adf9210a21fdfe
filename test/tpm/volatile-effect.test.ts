// Which commands an exactly-once session must checkpoint in full, can log for replay, or need nothing.
import { describe, expect, it } from 'vitest';
import { stirRandom, volatileEffect } from '../../src/tpm/volatile-effect.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import * as tpm12 from '../../src/tpm/tpm12-commands.js';
import { TpmHost } from '../../src/tpm/host.js';
import { hex, unhex } from './helpers.js';

describe('volatile effect of a command', () => {
  it('reads and GetRandom without sessions need nothing; PCR_Extend with a password session replays; others are full', () => {
    expect(volatileEffect('2.0', tpm2.getRandom(8))).toBe('none');
    expect(volatileEffect('2.0', tpm2.pcrReadSha256(16))).toBe('none');
    // PCR_Extend(16) authorized by TPM_RS_PW with an empty password: the bytes, then 'replay'.
    const extend = tpm2.pcrExtendSha256(16, new Uint8Array(32));
    expect(hex(extend.subarray(0, 27))).toBe('8002000000410000018200000010' + '00000009' + '40000009' + '0000' + '00' + '0000');
    expect(volatileEffect('2.0', extend)).toBe('replay');
    // The same extend under an HMAC session (handle 0x02000000, a nonce): its nonces change, so full.
    const hmac = Buffer.from(extend);
    hmac.writeUInt32BE(0x02000000, 18);
    expect(volatileEffect('2.0', hmac)).toBe('full');
    // A session area whose size lies is not trusted to be password-only.
    const lying = Buffer.from(extend);
    lying.writeUInt32BE(10, 14);
    expect(volatileEffect('2.0', lying)).toBe('full');
    expect(volatileEffect('2.0', tpm2.startup())).toBe('full');
    expect(volatileEffect('2.0', unhex('8001 0000000a 00000144'))).toBe('full'); // size field lies
    expect(volatileEffect('1.2', tpm12.getRandom(8))).toBe('none');
    expect(volatileEffect('1.2', tpm12.startup())).toBe('full');
  });

  it('StirRandom as built is accepted by libtpms (2.0 and 1.2)', async () => {
    const host = new TpmHost();
    try {
      const memStore = () => {
        const mem = new Map<string, Uint8Array>();
        return { load: async (_: number, k: string) => mem.get(k) ?? null, store: async (_: number, k: string, b: Uint8Array) => void mem.set(k, b), delete: async (_: number, k: string) => void mem.delete(k) };
      };
      const t2 = await host.create({ instance: 1, version: '2.0', store: memStore(), startup: 'clear' });
      expect(hex(await t2.execute(stirRandom('2.0', new Uint8Array(32).fill(7))))).toBe('80010000000a00000000');
      const t12 = await host.create({ instance: 2, version: '1.2', store: memStore(), startup: 'clear' });
      expect(hex(await t12.execute(stirRandom('1.2', new Uint8Array(32).fill(7))))).toBe('00c40000000a00000000');
    } finally {
      await host.destroyAll();
    }
  });
});
