// TPM 1.2 manufacture on a real libtpms TPM 1.2: the EK made by TPM_CreateEndorsementKeyPair is the
// one TPM_ReadPubek reports and the certificate certifies; index 0x1000F000 holds the certificate
// behind the 7-byte TCG_PCCLIENT_STORED_CERT / TCG_FULL_CERT header; after manufacture the NV is
// locked: the owner (after TPM_TakeOwnership) reads the index, but neither the owner nor anyone
// unauthorised can rewrite or delete it. The bytes on the wire are shown.
import { afterAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import { TpmHost } from '../../src/tpm/host.js';
import {
  EK12_CERT_INDEX,
  EK12_CERT_PERMISSIONS,
  createEndorsementKeyPair,
  manufactureEk12,
  nvDefineSpace12,
  nvReadValue12,
  nvWriteValue12,
  parseEndorsementKeyPair,
  parseStoredCert,
  storedCert,
  type Ek12Issuer,
  type Tpm12Identity,
} from '../../src/tpm/ek12.js';
import { ManufactureError } from '../../src/tpm/ek-manufacture.js';
import { responseCode } from '../../src/tpm/wire.js';
import { nvDelete, nvIndexSize, ownerNvReadAll, ownerNvWrite, readPubek, takeOwnership } from '../helpers/tpm12-owner.js';
import { hex, tempStore } from './helpers.js';

const host = new TpmHost();
const t = tempStore('ek12');
afterAll(async () => {
  await host.destroyAll();
  t.cleanup();
});

let next = 1;
const fresh = () => host.create({ instance: next++, version: '1.2', store: t.store });

/** An issuer of fixed "certificates" that records the key and identity it was given. */
function issuer(size: number): Ek12Issuer & { asked: Array<{ modulus: Buffer; id: Tpm12Identity }> } {
  const asked: Array<{ modulus: Buffer; id: Tpm12Identity }> = [];
  return {
    asked,
    issue: async (modulus, id) => {
      asked.push({ modulus: Buffer.from(modulus), id });
      return Uint8Array.from({ length: size }, (_, i) => (i * 13 + 5) & 0xff);
    },
  };
}

describe('TPM 1.2 EK manufacture', () => {
  it('the commands on the wire: CreateEndorsementKeyPair (RSA 2048, OAEP), NV_DefineSpace of 0x1000F000, the stored-certificate header', () => {
    const nonce = Buffer.alloc(20, 0xab);
    expect(hex(createEndorsementKeyPair(nonce))).toBe(
      // tag c1, size 0x36, ordinal 0x78, antiReplay, TPM_KEY_PARMS {RSA, OAEP_SHA1_MGF1, SS_NONE, 12, {2048, 2 primes, exponent default}}
      '00c100000036' + '00000078' + 'ab'.repeat(20) + '00000001' + '0003' + '0001' + '0000000c' + '00000800' + '00000002' + '00000000',
    );
    expect(hex(nvDefineSpace12(EK12_CERT_INDEX, EK12_CERT_PERMISSIONS, 0x3c0))).toBe(
      '00c100000065' + '000000cc' + '0018' + '1000f000' +
        ('0003' + '000000' + '1f' + '00'.repeat(20)).repeat(2) + // pcrInfoRead, pcrInfoWrite: no PCRs, any locality
        '0017' + '00022002' + '000000' + '000003c0' + // OWNERREAD | WRITEDEFINE | OWNERWRITE, flags clear, size
        '00'.repeat(20), // encAuth
    );
    expect(hex(storedCert(Uint8Array.from([0x30, 0x82, 0x01, 0x02])))).toBe('1001' + '00' + '0006' + '1002' + '30820102');
    expect(hex(parseStoredCert(storedCert(Uint8Array.from([1, 2, 3]))))).toBe('010203');
    expect(() => parseStoredCert(Uint8Array.from([0x10, 0x01, 0x00, 0x00, 0x09, 0x10, 0x02, 1]))).toThrow(ManufactureError);
  });

  it('a checksum that does not bind the key to the nonce is refused', async () => {
    const tpm = await fresh();
    await tpm.execute(Uint8Array.from(Buffer.from('00c10000000c000000990001', 'hex')));
    const nonce = crypto.randomBytes(20);
    const r = Buffer.from(await tpm.execute(createEndorsementKeyPair(nonce)));
    expect(parseEndorsementKeyPair(r, nonce)).toHaveLength(256);
    expect(() => parseEndorsementKeyPair(r, crypto.randomBytes(20))).toThrow(/checksum does not match/);
  });

  it('certifies the EK the TPM reports, writes it behind the header, and locks index and NV', async () => {
    const tpm = await fresh();
    const iss = issuer(900);
    const der = await manufactureEk12(tpm, iss);
    expect(iss.asked).toHaveLength(1);
    // libtpms' TPM_CAP_VERSION_VAL: vendor "IBM\0", spec level 2, errata 3 (1.2 revision 116).
    expect(iss.asked[0]!.id).toMatchObject({ manufacturer: 0x49424d00, specLevel: 2, errataRev: 3 });
    const pubek = await readPubek(tpm);
    expect(pubek.equals(iss.asked[0]!.modulus)).toBe(true);

    const pub = await nvIndexSize(tpm, EK12_CERT_INDEX);
    expect(pub).toEqual({ size: 900 + 7, permissions: EK12_CERT_PERMISSIONS, bWriteDefine: 1 });
    // NV is locked: an unauthorised read of an OWNERREAD index is TPM_AUTH_CONFLICT (0x3b).
    expect(responseCode(await tpm.execute(nvReadValue12(EK12_CERT_INDEX, 0, 16)))).toBe(0x3b);

    await takeOwnership(tpm, pubek);
    const data = await ownerNvReadAll(tpm, EK12_CERT_INDEX, pub.size);
    expect(hex(data.subarray(0, 7))).toBe('1001' + '00' + (900 + 2).toString(16).padStart(4, '0') + '1002');
    expect(Buffer.from(parseStoredCert(data)).equals(Buffer.from(der))).toBe(true);

    // The owner cannot rewrite it (TPM_AREA_LOCKED 0x3c), nobody unauthorised can (TPM_AUTH_CONFLICT),
    // and nobody can delete it: a D-bit index is manufacturer-only once NV is locked (TPM_BADINDEX 0x2).
    expect(responseCode(await ownerNvWrite(tpm, EK12_CERT_INDEX, 0, Buffer.from('overwrite')))).toBe(0x3c);
    expect(responseCode(await tpm.execute(nvWriteValue12(EK12_CERT_INDEX, 0, Buffer.from('overwrite'))))).toBe(0x3b);
    expect(responseCode(await nvDelete(tpm, EK12_CERT_INDEX))).toBe(0x02);
    expect(Buffer.from(parseStoredCert(await ownerNvReadAll(tpm, EK12_CERT_INDEX, pub.size))).equals(Buffer.from(der))).toBe(true);
  });

  it('a certificate the TPM has no room for stops manufacture with the TPM\'s answer', async () => {
    const tpm = await fresh();
    await expect(manufactureEk12(tpm, issuer(60_000))).rejects.toThrow(/TPM_NV_DefineSpace 0x1000f000 \(60007 bytes\) failed with TPM response code 0x/);
  });
});
