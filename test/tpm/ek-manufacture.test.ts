// Manufacture on a real libtpms TPM 2.0: the TCG EK templates on the wire, the EK public key the TPM
// derives, certificates written by the platform into locked indices the owner cannot touch, and a
// certificate too large for an NV index refused before anything is written.
import { afterAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import { EK_CERT_INDEX, EK_CERT_NV_ATTRIBUTES, PLATFORM_CERT_INDEX, createPrimaryEk, ekTemplate, parseCreatePrimaryEk } from '../../src/tpm/ek-commands.js';
import { ManufactureError, ekPublic, manufactureEk, type EkIssuer } from '../../src/tpm/ek-manufacture.js';
import { nvDefineSpace, nvRead, nvWrite, parseNvRead, startup } from '../../src/tpm/tpm2-commands.js';
import { Marshal, TPM2_ST_NO_SESSIONS, command, responseCode } from '../../src/tpm/wire.js';
import { hex, tempStore } from './helpers.js';

const host = new TpmHost();
const t = tempStore('ek');
afterAll(async () => {
  await host.destroyAll();
  t.cleanup();
});

let next = 1;
async function freshTpm() {
  return host.create({ instance: next++, version: '2.0', store: t.store });
}

/** An issuer that hands out fixed bytes and records what it was asked to certify. */
function fixedIssuer(size: number): EkIssuer & { asked: string[] } {
  const asked: string[] = [];
  return {
    asked,
    issue: async (pub) => {
      asked.push(pub.alg);
      return Uint8Array.from({ length: size }, (_, i) => (i * 7 + (pub.alg === 'rsa' ? 1 : 2)) & 0xff);
    },
  };
}

/** TPM2_NV_ReadPublic: the index's attributes and data size. */
async function readPublic(tpm: { execute(c: Uint8Array): Promise<Uint8Array> }, index: number): Promise<{ attributes: number; size: number }> {
  const r = Buffer.from(await tpm.execute(command(TPM2_ST_NO_SESSIONS, 0x169, new Marshal().u32(index))));
  expect(responseCode(r)).toBe(0);
  // header 10, TPM2B_NV_PUBLIC {size 2, nvIndex 4, nameAlg 2, attributes 4, authPolicy 2+n, dataSize 2}
  const policy = r.readUInt16BE(10 + 2 + 4 + 2 + 4);
  return { attributes: r.readUInt32BE(18), size: r.readUInt16BE(22 + 2 + policy) };
}

describe('EK templates on the wire', () => {
  it('CreatePrimary(EK, RSA) is template L-1 and the ECC one L-2: PolicySecret(endorsement), AES-128-CFB, zero-filled unique', () => {
    const policy = '837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa';
    // RSA, SHA-256, attributes 0x000300b2, policy, AES 128 CFB, scheme NULL, 2048 bits, exponent 0 (65537), unique 256 zero bytes
    expect(hex(ekTemplate('rsa'))).toBe('0001' + '000b' + '000300b2' + '0020' + policy + '0006' + '0080' + '0043' + '0010' + '0800' + '00000000' + '0100' + '00'.repeat(256));
    // ECC, SHA-256, same attributes and policy, AES 128 CFB, scheme NULL, NIST P-256, kdf NULL, x and y 32 zero bytes each
    expect(hex(ekTemplate('ecc'))).toBe('0023' + '000b' + '000300b2' + '0020' + policy + '0006' + '0080' + '0043' + '0010' + '0003' + '0010' + '0020' + '00'.repeat(32) + '0020' + '00'.repeat(32));
    // tag 8002, size 355, CreatePrimary 0x131, TPM_RH_ENDORSEMENT, auth area (9 bytes: TPM_RS_PW, empty), sensitive (empty), template size 314
    expect(hex(createPrimaryEk('rsa')).slice(0, 70)).toBe('8002' + '00000163' + '00000131' + '4000000b' + '00000009' + '40000009' + '0000' + '00' + '0000' + '0004' + '0000' + '0000' + '013a');
    // after the template: outsideInfo empty, creationPCR count 0
    expect(hex(createPrimaryEk('rsa')).slice(70 + 628)).toBe('0000' + '00000000');
  });

  it('refuses a CreatePrimary answer whose public area is not the template, or that is cut short', async () => {
    const tpm = await freshTpm();
    await tpm.execute(startup());
    const ok = await tpm.execute(createPrimaryEk('ecc'));
    expect(() => parseCreatePrimaryEk(ok, 'rsa')).toThrow(/not the rsa EK template/);
    expect(() => parseCreatePrimaryEk(ok.subarray(0, 60), 'ecc')).toThrow(/ends at byte 60/);
    expect(parseCreatePrimaryEk(ok, 'ecc').pub.alg).toBe('ecc');
  });
});

describe('manufactureEk on libtpms', () => {
  it('derives the same EK again from the same seed (what tpm2_createek will find), and a different one on another TPM', async () => {
    const a = await freshTpm();
    const b = await freshTpm();
    await manufactureEk(a, 'rsa', fixedIssuer(600));
    await a.execute(startup());
    await b.execute(startup());
    const pa = await ekPublic(a, 'rsa');
    const again = await ekPublic(a, 'rsa');
    const pb = await ekPublic(b, 'rsa');
    expect(pa.alg === 'rsa' && again.alg === 'rsa' && hex(pa.modulus)).toBe(again.alg === 'rsa' && hex(again.modulus));
    expect(pa.alg === 'rsa' && pb.alg === 'rsa' && hex(pa.modulus) !== hex(pb.modulus)).toBe(true);
  });

  it('writes each certificate into its TCG index with the platform attributes, locked: the owner can read but not write', async () => {
    const tpm = await freshTpm();
    const issuer = fixedIssuer(1500); // two NV_Write pieces
    const certs = await manufactureEk(tpm, 'both', issuer);
    expect(issuer.asked).toEqual(['rsa', 'ecc']);
    await tpm.execute(startup());
    for (const alg of ['rsa', 'ecc'] as const) {
      const pub = await readPublic(tpm, EK_CERT_INDEX[alg]);
      // PLATFORMCREATE|AUTHREAD|OWNERREAD|PPREAD|PPWRITE|NO_DA|WRITEDEFINE, then WRITTEN and WRITELOCKED.
      expect(pub.attributes.toString(16)).toBe((EK_CERT_NV_ATTRIBUTES | 0x20000000 | 0x800).toString(16));
      expect(pub.attributes.toString(16)).toBe('62072801');
      expect(pub.size).toBe(1500);
      let got = Buffer.alloc(0);
      for (let off = 0; off < 1500; off += 1024) got = Buffer.concat([got, parseNvRead(await tpm.execute(nvRead(EK_CERT_INDEX[alg], Math.min(1024, 1500 - off), off)))]);
      expect(hex(got)).toBe(hex(certs.get(alg)!));
      // The owner's NV_Write: TPM_RC_NV_LOCKED 0x148; the index stays as it was.
      expect(responseCode(await tpm.execute(nvWrite(EK_CERT_INDEX[alg], new Uint8Array(4))))).toBe(0x148);
      // Defining it again as the owner: TPM_RC_NV_DEFINED 0x14c.
      expect(responseCode(await tpm.execute(nvDefineSpace(EK_CERT_INDEX[alg], 16)))).toBe(0x14c);
    }
  });

  it('refuses a certificate larger than an NV index holds, naming sizes, before writing any index', async () => {
    const tpm = await freshTpm();
    const err = await manufactureEk(tpm, 'both', fixedIssuer(2049)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ManufactureError);
    expect((err as ManufactureError).code).toBe('TOO_LARGE');
    expect((err as Error).message).toBe('the rsa EK certificate is 2049 bytes; an NV index of this TPM holds at most 2048');
    const r = await tpm.execute(command(TPM2_ST_NO_SESSIONS, 0x169, new Marshal().u32(EK_CERT_INDEX.rsa)));
    expect(responseCode(r)).toBe(0x18b); // TPM_RC_HANDLE (parameter 1): no such index
  });
});

describe('the platform certificate at manufacture', () => {
  it('is asked for with the first EK certificate as holder and written locked into 0x01C08000 like the EK certificates', async () => {
    const tpm = await freshTpm();
    const held: string[] = [];
    const issuer = { ...fixedIssuer(700), platform: async (ek: Uint8Array) => (held.push(hex(ek)), Uint8Array.from({ length: 640 }, (_, i) => i & 0xff)) };
    const certs = await manufactureEk(tpm, 'ecc', issuer);
    expect(held).toEqual([hex(certs.get('ecc')!)]);
    await tpm.execute(startup());
    const pub = await readPublic(tpm, PLATFORM_CERT_INDEX);
    expect(pub).toEqual({ attributes: 0x62072801, size: 640 });
    expect(hex(parseNvRead(await tpm.execute(nvRead(PLATFORM_CERT_INDEX, 640, 0))))).toBe(hex(certs.get('platform')!));
    expect(responseCode(await tpm.execute(nvWrite(PLATFORM_CERT_INDEX, new Uint8Array(4))))).toBe(0x148);
  });

  it('one too large for an NV index stops manufacture before any index is written', async () => {
    const tpm = await freshTpm();
    const err = await manufactureEk(tpm, 'rsa', { ...fixedIssuer(700), platform: async () => new Uint8Array(2049) }).catch((e: unknown) => e);
    expect((err as ManufactureError).code).toBe('TOO_LARGE');
    expect((err as Error).message).toBe('the platform certificate is 2049 bytes; an NV index of this TPM holds at most 2048');
    expect(responseCode(await tpm.execute(command(TPM2_ST_NO_SESSIONS, 0x169, new Marshal().u32(EK_CERT_INDEX.rsa))))).toBe(0x18b);
  });
});
