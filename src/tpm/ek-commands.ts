// TPM 2.0 commands of manufacture: the TCG default EK templates (EK Credential Profile 2.0, templates
// L-1 RSA 2048 and L-2 ECC NIST P-256, the ones `tpm2_createek` uses), NV indices written by the platform,
// and the properties an EK certificate names. Byte layouts follow TPM 2.0 Part 3; every authorisation
// is an empty password session, which is what the hierarchies of a freshly manufactured TPM take.
import { Marshal, TPM2_ST_NO_SESSIONS, TPM2_ST_SESSIONS, command } from './wire.js';
import { TPM_ALG_AES, TPM_ALG_CFB, TPM_ALG_NULL, TPM_ALG_RSA, TPM_ALG_SHA256, TPM_CC_CreatePrimary, TPM_CC_GetCapability, TPM_CC_NV_DefineSpace, TPM_CC_NV_Write, TPM_RS_PW, expectSuccess } from './tpm2-commands.js';

export const TPM_CC_NV_WriteLock = 0x138;
export const TPM_CC_FlushContext = 0x165;
export const TPM_RH_ENDORSEMENT = 0x4000000b;
export const TPM_RH_PLATFORM = 0x4000000c;
export const TPM_ALG_ECC = 0x0023;
export const TPM_ECC_NIST_P256 = 0x0003;
export const TPM_CAP_TPM_PROPERTIES = 0x00000006;

/** EK certificate NV indices (TCG EK Credential Profile 2.0, section 2.2.1.4). */
export const EK_CERT_INDEX = { rsa: 0x01c00002, ecc: 0x01c0000a } as const;
export type EkAlg = keyof typeof EK_CERT_INDEX;
/** The platform certificate's index (TCG PC Client Platform TPM Profile; where swtpm_setup writes it). */
export const PLATFORM_CERT_INDEX = 0x01c08000;

/**
 * Attributes of a manufacturer-provisioned certificate index, as swtpm_setup writes them: made and
 * written by the platform, readable by owner, platform and with the (empty) index auth; no owner or
 * index-auth write at all; WRITEDEFINE so that NV_WriteLock locks it for the life of the index.
 */
export const TPMA_NV = {
  PPWRITE: 0x1,
  WRITEDEFINE: 0x2000,
  PPREAD: 0x10000,
  OWNERREAD: 0x20000,
  AUTHREAD: 0x40000,
  NO_DA: 0x2000000,
  WRITTEN: 0x20000000,
  WRITELOCKED: 0x800,
  PLATFORMCREATE: 0x40000000,
} as const;
export const EK_CERT_NV_ATTRIBUTES =
  TPMA_NV.PLATFORMCREATE | TPMA_NV.AUTHREAD | TPMA_NV.OWNERREAD | TPMA_NV.PPREAD | TPMA_NV.PPWRITE | TPMA_NV.NO_DA | TPMA_NV.WRITEDEFINE;

/** PolicySecret(TPM_RH_ENDORSEMENT): the authPolicy of the default EK templates (profile B.3.3). */
export const EK_AUTH_POLICY = Uint8Array.from(Buffer.from('837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa', 'hex'));
/** fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | restricted | decrypt. */
export const EK_OBJECT_ATTRIBUTES = 0x000300b2;

/** The largest NV_Write a TPM takes at once (libtpms' MAX_NV_BUFFER_SIZE); longer data goes in pieces. */
export const NV_WRITE_CHUNK = 1024;

function pwAuth(m: Marshal): Marshal {
  return m.u32(9).u32(TPM_RS_PW).u16(0).u8(0).u16(0);
}

/** TPMT_PUBLIC of template L-1 (RSA 2048) or L-2 (ECC NIST P-256): empty unique, as the profile fixes it. */
export function ekTemplate(alg: EkAlg): Uint8Array {
  const m = new Marshal().u16(alg === 'rsa' ? TPM_ALG_RSA : TPM_ALG_ECC).u16(TPM_ALG_SHA256).u32(EK_OBJECT_ATTRIBUTES).tpm2b(EK_AUTH_POLICY);
  m.u16(TPM_ALG_AES).u16(128).u16(TPM_ALG_CFB).u16(TPM_ALG_NULL);
  // RSA: keyBits 2048, exponent 0 (65537), unique 256 zero bytes. ECC: P-256, kdf NULL, unique x and y 32 zero bytes each.
  if (alg === 'rsa') m.u16(2048).u32(0).tpm2b(new Uint8Array(256));
  else m.u16(TPM_ECC_NIST_P256).u16(TPM_ALG_NULL).tpm2b(new Uint8Array(32)).tpm2b(new Uint8Array(32));
  return m.toBytes();
}

/** CreatePrimary of the EK under the endorsement hierarchy. */
export function createPrimaryEk(alg: EkAlg): Uint8Array {
  const m = new Marshal().u32(TPM_RH_ENDORSEMENT);
  pwAuth(m);
  m.u16(4).u16(0).u16(0); // TPM2B_SENSITIVE_CREATE: empty userAuth and data
  m.tpm2b(ekTemplate(alg));
  m.u16(0); // outsideInfo
  m.u32(0); // creationPCR: none
  return command(TPM2_ST_SESSIONS, TPM_CC_CreatePrimary, m);
}

export type EkPublic = { alg: 'rsa'; modulus: Uint8Array; exponent: number } | { alg: 'ecc'; curve: 'P-256'; x: Uint8Array; y: Uint8Array };

export class EkResponseError extends Error {
  readonly code = 'MALFORMED';
  constructor(message: string) {
    super(message);
    this.name = 'EkResponseError';
  }
}

/** The object handle and public key of a CreatePrimary(EK) response; anything but the template asked for is refused. */
export function parseCreatePrimaryEk(resp: Uint8Array, alg: EkAlg): { handle: number; pub: EkPublic } {
  expectSuccess(resp, 'CreatePrimary (EK)');
  const v = new DataView(resp.buffer, resp.byteOffset, resp.byteLength);
  let o = 10;
  const need = (n: number): void => {
    if (o + n > resp.length) throw new EkResponseError(`CreatePrimary response ends at byte ${resp.length}, ${o + n} needed`);
  };
  need(4 + 4 + 2);
  const handle = v.getUint32(o);
  o += 8; // handle, parameterSize
  const pubSize = v.getUint16(o);
  o += 2;
  need(pubSize);
  const template = ekTemplate(alg);
  // outPublic repeats the template up to the unique field, which now holds the key.
  const fixed = alg === 'rsa' ? template.length - 258 : template.length - 68;
  if (!Buffer.from(resp.subarray(o, o + fixed)).equals(Buffer.from(template.subarray(0, fixed))))
    throw new EkResponseError(`CreatePrimary returned a public area that is not the ${alg} EK template`);
  const end = o + pubSize;
  o += fixed;
  const tpm2b = (): Uint8Array => {
    need(2);
    const n = v.getUint16(o);
    o += 2;
    need(n);
    const b = resp.slice(o, o + n);
    o += n;
    return b;
  };
  if (alg === 'rsa') {
    const modulus = tpm2b();
    if (modulus.length !== 256 || o !== end) throw new EkResponseError(`RSA EK modulus of ${modulus.length} bytes (256 expected)`);
    return { handle, pub: { alg, modulus, exponent: 65537 } };
  }
  const x = tpm2b();
  const y = tpm2b();
  if (x.length !== 32 || y.length !== 32 || o !== end) throw new EkResponseError(`ECC EK point of ${x.length}+${y.length} bytes (32+32 expected)`);
  return { handle, pub: { alg, curve: 'P-256', x, y } };
}

export function flushContext(handle: number): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_FlushContext, new Marshal().u32(handle));
}

/** NV_DefineSpace by the platform, with the attributes of a manufacturer's certificate index. */
export function nvDefinePlatform(index: number, size: number, attributes: number = EK_CERT_NV_ATTRIBUTES): Uint8Array {
  const nvPublic = new Marshal().u32(index).u16(TPM_ALG_SHA256).u32(attributes).u16(0).u16(size).toBytes();
  const m = new Marshal().u32(TPM_RH_PLATFORM);
  pwAuth(m);
  m.u16(0).tpm2b(nvPublic);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_DefineSpace, m);
}

/** NV_Write by the platform (authHandle TPM_RH_PLATFORM). */
export function nvWritePlatform(index: number, data: Uint8Array, offset: number): Uint8Array {
  if (data.length > NV_WRITE_CHUNK) throw new RangeError(`NV_Write of ${data.length} bytes (at most ${NV_WRITE_CHUNK})`);
  const m = new Marshal().u32(TPM_RH_PLATFORM).u32(index);
  pwAuth(m);
  m.tpm2b(data).u16(offset);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_Write, m);
}

/** NV_WriteLock by the platform: with WRITEDEFINE the index stays locked until it is undefined. */
export function nvWriteLockPlatform(index: number): Uint8Array {
  const m = new Marshal().u32(TPM_RH_PLATFORM).u32(index);
  pwAuth(m);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_WriteLock, m);
}

/** TPM properties a certificate's subjectAltName names (Part 2, TPM_PT). */
export const TPM_PT = {
  FAMILY_INDICATOR: 0x100,
  LEVEL: 0x101,
  REVISION: 0x102,
  MANUFACTURER: 0x105,
  VENDOR_STRING_1: 0x106,
  FIRMWARE_VERSION_1: 0x10b,
  FIRMWARE_VERSION_2: 0x10c,
  NV_INDEX_MAX: 0x117,
} as const;

export function getProperties(first: number, count: number): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_GetCapability, new Marshal().u32(TPM_CAP_TPM_PROPERTIES).u32(first).u32(count));
}

/** property → value of a GetCapability(TPM_CAP_TPM_PROPERTIES) response. */
export function parseProperties(resp: Uint8Array): Map<number, number> {
  expectSuccess(resp, 'GetCapability (TPM properties)');
  const v = new DataView(resp.buffer, resp.byteOffset, resp.byteLength);
  // header 10, moreData 1, capability 4, TPML_TAGGED_TPM_PROPERTY {count 4, {property 4, value 4}...}
  if (resp.length < 19) throw new EkResponseError(`GetCapability response of ${resp.length} bytes`);
  const count = v.getUint32(15);
  if (19 + 8 * count > resp.length) throw new EkResponseError(`GetCapability response claims ${count} properties in ${resp.length} bytes`);
  const out = new Map<number, number>();
  for (let i = 0; i < count; i++) out.set(v.getUint32(19 + 8 * i), v.getUint32(23 + 8 * i));
  return out;
}
