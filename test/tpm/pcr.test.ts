// PCR behaviour of engine instances against a software model: a PCR after extends equals
// H(...H(H(0…0 || d1) || d2)... ) — SHA-256 for TPM 2.0 bank, SHA-1 for TPM 1.2.
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import * as tpm12 from '../../src/tpm/tpm12-commands.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { hex, tempStore, unhex } from './helpers.js';

function model(alg: 'sha256' | 'sha1', digests: Uint8Array[]): Uint8Array {
  let pcr = new Uint8Array(alg === 'sha256' ? 32 : 20);
  for (const d of digests) pcr = new Uint8Array(createHash(alg).update(pcr).update(d).digest());
  return pcr;
}

describe('TPM 2.0 PCRs', () => {
  const t = tempStore('pcr2');
  const host = new TpmHost();
  let tpm: TpmInstance;

  beforeAll(async () => {
    tpm = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
  });
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('answers PCR_Read with the exact bytes of a fresh SHA-256 PCR 16', async () => {
    const resp = await tpm.execute(tpm2.pcrReadSha256(16));
    // tag 8001, size 0x3e, rc 0, updateCounter, selection {1, sha256, 3, 00 00 01}, 1 digest of 32 zeros
    expect(hex(resp.subarray(0, 10))).toBe('8001' + '0000003e' + '00000000');
    expect(hex(resp.subarray(14))).toBe('00000001' + '000b' + '03' + '000001' + '00000001' + '0020' + '00'.repeat(32));
  });

  it('extends equal the SHA-256 model for any sequence of digests', async () => {
    let pcr = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(fc.uint8Array({ minLength: 32, maxLength: 32 }), { minLength: 1, maxLength: 6 }), async (digests) => {
        // PCR 16 (debug) and 23 (application) take extends from locality 0 (PC Client profile).
        const index = pcr++ % 2 === 0 ? 16 : 23;
        const before = tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(index)));
        for (const d of digests) {
          const r = await tpm.execute(tpm2.pcrExtendSha256(index, d));
          expect(hex(r)).toBe('80020000001300000000' + '00000000' + '0000010000');
        }
        const after = tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(index)));
        let expected = before;
        for (const d of digests) expected = new Uint8Array(createHash('sha256').update(expected).update(d).digest());
        expect(hex(after)).toBe(hex(expected));
      }),
      { numRuns: 40 },
    );
  });

  it('passes the locality through: PCR 21 refuses locality 0 (TPM_RC_LOCALITY) and takes locality 2', async () => {
    const d = unhex('11'.repeat(32));
    expect(hex(await tpm.execute(tpm2.pcrExtendSha256(21, d), { locality: 0 }))).toBe('80010000000a00000907');
    expect(hex(await tpm.execute(tpm2.pcrExtendSha256(21, d), { locality: 2 }))).toBe('80020000001300000000' + '00000000' + '0000010000');
    await expect(tpm.execute(tpm2.pcrExtendSha256(21, d), { locality: 5 })).rejects.toMatchObject({ code: 'LOCALITY' });
  });

  it('Shutdown(STATE) then a power cycle and Startup(STATE) keep PCR 10 (PCRs 0-15 are saved; 16-23 are not)', async () => {
    await tpm.execute(tpm2.pcrExtendSha256(10, unhex('33'.repeat(32))));
    const before = hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(10))));
    expect(await tpm.shutdown('state')).toBe(0);
    await tpm.reset();
    expect(await tpm.startup('state')).toBe(0);
    expect(hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(10))))).toBe(before);
  });

  it('PCR 0 after one known extend matches the model byte for byte', async () => {
    const d = unhex('00'.repeat(31) + '01');
    await tpm.execute(tpm2.pcrExtendSha256(0, d));
    expect(hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(0))))).toBe(hex(model('sha256', [d])));
  });
});

describe('TPM 1.2 basics', () => {
  const t = tempStore('pcr12');
  const host = new TpmHost();
  let tpm: TpmInstance;

  beforeAll(async () => {
    tpm = await host.create({ instance: 1, version: '1.2', store: t.store });
  });
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('refuses commands before TPM_Startup with TPM_INVALID_POSTINIT, then starts', async () => {
    expect(hex(await tpm.execute(tpm12.pcrRead(10)))).toBe('00c40000000a00000026');
    expect(await tpm.startup('clear')).toBe(0);
  });

  it('TPM_Extend and TPM_PCRRead follow the SHA-1 model', async () => {
    const digests = [unhex('01'.repeat(20)), unhex('ab'.repeat(20)), unhex('00'.repeat(20))];
    let last: Uint8Array = new Uint8Array(0);
    for (const d of digests) last = tpm12.parsePcrValue(await tpm.execute(tpm12.extend(10, d)));
    const read = await tpm.execute(tpm12.pcrRead(10));
    expect(hex(read.subarray(0, 10))).toBe('00c4' + '0000001e' + '00000000');
    expect(hex(tpm12.parsePcrValue(read))).toBe(hex(model('sha1', digests)));
    expect(hex(last)).toBe(hex(model('sha1', digests)));
    // The first extend of all-0x01 into a zero PCR, as a fixed vector.
    expect(hex(model('sha1', [digests[0]!]))).toBe('c3ad7f64b8d976aaf2b3a9c98f7ee5631cde7125');
  });

  it('TPM_SaveState keeps PCRs across a power cycle resumed with TPM_Startup(ST_STATE)', async () => {
    const before = hex(tpm12.parsePcrValue(await tpm.execute(tpm12.pcrRead(10))));
    expect(await tpm.shutdown('state')).toBe(0); // TPM_SaveState
    expect(hex((await tpm.getStateBlob('savestate'))!.subarray(0, 6))).toBe('0201000a0004');
    await tpm.reset();
    expect(await tpm.startup('state')).toBe(0);
    expect(hex(tpm12.parsePcrValue(await tpm.execute(tpm12.pcrRead(10))))).toBe(before);
  });
});
