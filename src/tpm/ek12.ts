// Manufacture of a TPM 1.2's endorsement credential, once, on a TPM no one has seen: its EK made with
// TPM_CreateEndorsementKeyPair (a fresh libtpms 1.2 TPM has none), the certificate from an issuer,
// stored at the TCG index 0x1000F000 behind the PC Client stored-certificate header, locked there, and
// the TPM's NV locked as a manufacturer leaves it (docs/ek-certificates.md). Layouts follow TPM 1.2
// Part 2/3; every command is unauthorised, which a TPM takes while its NV is not yet locked.
import crypto from 'node:crypto';
import { Marshal, TPM_TAG_RQU_COMMAND, command } from './wire.js';
import { startup } from './tpm12-commands.js';
import { ManufactureError, run, type Executor } from './ek-manufacture.js';

export const TPM_ORD_GetCapability = 0x65;
export const TPM_ORD_CreateEndorsementKeyPair = 0x78;
export const TPM_ORD_NV_DefineSpace = 0xcc;
export const TPM_ORD_NV_WriteValue = 0xcd;
export const TPM_ORD_NV_ReadValue = 0xcf;
const TPM_CAP_VERSION_VAL = 0x1a;

/** TPM_NV_INDEX_EKCert: the D bit (defined at manufacture, never deletable once NV is locked) | 0xF000. */
export const EK12_CERT_INDEX = 0x1000f000;
/** Setting this "index" locks the TPM's NV (TPM_PERMANENT_FLAGS.nvLocked): authorisation is enforced from then on. */
export const TPM_NV_INDEX_LOCK = 0xffffffff;

export const TPM_NV_PER = { OWNERWRITE: 0x2, WRITEDEFINE: 0x2000, OWNERREAD: 0x20000 } as const;
/**
 * swtpm_setup's OWNERREAD | OWNERWRITE, plus WRITEDEFINE so that the zero-length write after the
 * certificate locks the index for its life: the owner reads it, nobody rewrites it.
 */
export const EK12_CERT_PERMISSIONS = TPM_NV_PER.OWNERREAD | TPM_NV_PER.OWNERWRITE | TPM_NV_PER.WRITEDEFINE;

/** TCG_PCCLIENT_STORED_CERT (tag 0x1001, certType 0, certSize) + TCG_FULL_CERT tag 0x1002, then the DER. */
export const STORED_CERT_TAG = 0x1001;
export const FULL_CERT_TAG = 0x1002;
export const STORED_CERT_HEADER = 7;

/** The largest TPM_NV_WriteValue sent at once (well under libtpms' 4096-byte input buffer). */
export const NV12_WRITE_CHUNK = 1024;

/** What a 1.2 EK certificate says about its TPM. */
export interface Tpm12Identity {
  /** tpmVendorID of TPM_CAP_VERSION_VAL as a u32 ("IBM\0" for libtpms). */
  manufacturer: number;
  /** TPM_VERSION revMajor, revMinor: the vendor's firmware revision. */
  firmware: [number, number];
  /** specLevel and errataRev as the TPM reports them. */
  specLevel: number;
  errataRev: number;
}

export interface Ek12Issuer {
  issue(modulus: Uint8Array, id: Tpm12Identity): Promise<Uint8Array>;
}

/** TPM_KEY_PARMS of the EK: RSA, RSAES-OAEP-SHA1-MGF1, no signature scheme, 2048 bits, 2 primes, default exponent. */
function ekKeyParms(): Marshal {
  return new Marshal().u32(1).u16(3).u16(1).u32(12).u32(2048).u32(2).u32(0);
}

export function createEndorsementKeyPair(antiReplay: Uint8Array): Uint8Array {
  if (antiReplay.length !== 20) throw new RangeError('antiReplay is a 20-byte nonce');
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_CreateEndorsementKeyPair, new Marshal().bytes(antiReplay).bytes(ekKeyParms().toBytes()));
}

/** The 256-byte modulus of a CreateEndorsementKeyPair response, after checking its checksum against `antiReplay`. */
export function parseEndorsementKeyPair(resp: Uint8Array, antiReplay: Uint8Array): Uint8Array {
  // header 10 | TPM_PUBKEY { TPM_KEY_PARMS 24 | keyLength 4 | modulus 256 } | checksum 20
  const parms = ekKeyParms().toBytes();
  if (resp.length !== 10 + 24 + 4 + 256 + 20) throw new ManufactureError('TPM', `CreateEndorsementKeyPair answered ${resp.length} bytes, ${10 + 24 + 4 + 256 + 20} expected`);
  if (!Buffer.from(resp.subarray(10, 34)).equals(Buffer.from(parms)) || Buffer.from(resp.subarray(34, 38)).readUInt32BE() !== 256)
    throw new ManufactureError('TPM', 'CreateEndorsementKeyPair returned a key that is not the RSA 2048 EK asked for');
  const pubkey = resp.subarray(10, 294);
  const sum = crypto.createHash('sha1').update(pubkey).update(antiReplay).digest();
  if (!sum.equals(Buffer.from(resp.subarray(294, 314)))) throw new ManufactureError('TPM', 'CreateEndorsementKeyPair checksum does not match the key and nonce');
  return resp.slice(38, 294);
}

export function getVersionInfo(): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_GetCapability, new Marshal().u32(TPM_CAP_VERSION_VAL).u32(0));
}

/** TPM_CAP_VERSION_INFO: tag 0x0030, TPM_VERSION (1, 2, revMajor, revMinor), specLevel, errataRev, tpmVendorID. */
export function parseVersionInfo(resp: Uint8Array): Tpm12Identity {
  const b = Buffer.from(resp);
  if (b.length < 10 + 4 + 15 || b.readUInt16BE(14) !== 0x0030 || b[16] !== 1 || b[17] !== 2)
    throw new ManufactureError('TPM', `GetCapability(TPM_CAP_VERSION_VAL) answered ${b.toString('hex')}, not a TPM 1.2's version`);
  return { firmware: [b[18]!, b[19]!], specLevel: b.readUInt16BE(20), errataRev: b[22]!, manufacturer: b.readUInt32BE(23) };
}

/** TPM_NV_DefineSpace, unauthorised: no PCR binding (all localities), the given permissions, encAuth zero. */
export function nvDefineSpace12(index: number, permissions: number, size: number): Uint8Array {
  const pcrInfoShort = (m: Marshal): Marshal => m.u16(3).u8(0).u8(0).u8(0).u8(0x1f).bytes(new Uint8Array(20));
  const m = new Marshal().u16(0x0018).u32(index);
  pcrInfoShort(pcrInfoShort(m));
  m.u16(0x0017).u32(permissions).u8(0).u8(0).u8(0).u32(size);
  m.bytes(new Uint8Array(20));
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_NV_DefineSpace, m);
}

export function nvWriteValue12(index: number, offset: number, data: Uint8Array): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_NV_WriteValue, new Marshal().u32(index).u32(offset).u32(data.length).bytes(data));
}

export function nvReadValue12(index: number, offset: number, size: number): Uint8Array {
  return command(TPM_TAG_RQU_COMMAND, TPM_ORD_NV_ReadValue, new Marshal().u32(index).u32(offset).u32(size));
}

/** The index's content: the stored-certificate header (certSize counts the 0x1002 tag and the DER), then the DER. */
export function storedCert(der: Uint8Array): Uint8Array {
  if (der.length + 2 > 0xffff) throw new RangeError(`a certificate of ${der.length} bytes does not fit certSize`);
  return new Marshal().u16(STORED_CERT_TAG).u8(0).u16(der.length + 2).u16(FULL_CERT_TAG).bytes(der).toBytes();
}

/** The DER inside an index's content; a header that is not a full stored certificate is refused. */
export function parseStoredCert(data: Uint8Array): Uint8Array {
  const b = Buffer.from(data);
  if (b.length < STORED_CERT_HEADER || b.readUInt16BE(0) !== STORED_CERT_TAG || b[2] !== 0 || b.readUInt16BE(5) !== FULL_CERT_TAG || b.readUInt16BE(3) + 5 !== b.length)
    throw new ManufactureError('TPM', `index data does not start with a TCG_PCCLIENT_STORED_CERT full-certificate header: ${b.subarray(0, 7).toString('hex')}`);
  return b.subarray(STORED_CERT_HEADER);
}

/**
 * On a TPM 1.2 never started: Startup(CLEAR), the EK, the certificate written into 0x1000F000 and the
 * index locked (zero-length write), then the NV locked. Returns the certificate (DER).
 */
export async function manufactureEk12(tpm: Executor, issuer: Ek12Issuer): Promise<Uint8Array> {
  await run(tpm, startup(), 'TPM_Startup');
  const id = parseVersionInfo(await run(tpm, getVersionInfo(), 'TPM_GetCapability'));
  const nonce = crypto.randomBytes(20);
  const modulus = parseEndorsementKeyPair(await run(tpm, createEndorsementKeyPair(nonce), 'TPM_CreateEndorsementKeyPair'), nonce);
  const der = await issuer.issue(modulus, id);
  const data = storedCert(der);
  const hex = `0x${EK12_CERT_INDEX.toString(16)}`;
  await run(tpm, nvDefineSpace12(EK12_CERT_INDEX, EK12_CERT_PERMISSIONS, data.length), `TPM_NV_DefineSpace ${hex} (${data.length} bytes)`);
  for (let off = 0; off < data.length; off += NV12_WRITE_CHUNK)
    await run(tpm, nvWriteValue12(EK12_CERT_INDEX, off, data.subarray(off, off + NV12_WRITE_CHUNK)), `TPM_NV_WriteValue ${hex}`);
  await run(tpm, nvWriteValue12(EK12_CERT_INDEX, 0, new Uint8Array(0)), `TPM_NV_WriteValue ${hex} (lock)`);
  await run(tpm, nvDefineSpace12(TPM_NV_INDEX_LOCK, 0, 0), 'TPM_NV_DefineSpace (NV lock)');
  return der;
}
