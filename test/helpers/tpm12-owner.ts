// A TPM 1.2 owner as the tests play one, over any executor (a libtpms instance, a guest's TCTI bridge):
// TPM_ReadPubek, TPM_TakeOwnership (owner and SRK secrets OAEP-encrypted to the EK with the "TCPA"
// label), and NV commands authorised by the owner through an OIAP session (HMAC-SHA1 over the
// parameter digest and both nonces). Layouts follow TPM 1.2 Part 3; only what the EK tests need.
import crypto from 'node:crypto';
import { Marshal, command, responseCode } from '../../src/tpm/wire.js';
import { TPM_ORD_NV_ReadValue, TPM_ORD_NV_WriteValue, nvDefineSpace12 } from '../../src/tpm/ek12.js';

export interface Exec {
  execute(cmd: Uint8Array): Promise<Uint8Array>;
}

const TAG_RQU = 0x00c1;
const TAG_RQU_AUTH1 = 0x00c2;
const ORD_OIAP = 0x0a;
const ORD_TakeOwnership = 0x0d;
const ORD_ReadPubek = 0x7c;

/** The owner secret the tests take ownership with (SHA-1 of a password, as tpm-tools makes it). */
export const OWNER_AUTH = crypto.createHash('sha1').update('vtpm-owner').digest();

/** TPM_ReadPubek: the EK modulus (256 bytes), while the TPM has no owner. */
export async function readPubek(tpm: Exec): Promise<Buffer> {
  const r = Buffer.from(await tpm.execute(command(TAG_RQU, ORD_ReadPubek, new Uint8Array(20))));
  if (responseCode(r) !== 0) throw new Error(`TPM_ReadPubek: rc 0x${responseCode(r).toString(16)}`);
  // header 10 | TPM_KEY_PARMS 24 | keyLength 4 | modulus
  return r.subarray(38, 38 + r.readUInt32BE(34));
}

async function oiap(tpm: Exec): Promise<{ handle: number; nonceEven: Buffer }> {
  const r = Buffer.from(await tpm.execute(command(TAG_RQU, ORD_OIAP)));
  if (responseCode(r) !== 0) throw new Error(`TPM_OIAP: rc 0x${responseCode(r).toString(16)}`);
  return { handle: r.readUInt32BE(10), nonceEven: r.subarray(14, 34) };
}

/** One owner-authorised command: `params` are the bytes after the ordinal; returns the response. */
export async function ownerCommand(tpm: Exec, ordinal: number, params: Uint8Array, secret: Buffer = OWNER_AUTH): Promise<Buffer> {
  const { handle, nonceEven } = await oiap(tpm);
  const nonceOdd = crypto.randomBytes(20);
  const ord = Buffer.alloc(4);
  ord.writeUInt32BE(ordinal);
  const digest = crypto.createHash('sha1').update(ord).update(params).digest();
  const auth = crypto.createHmac('sha1', secret).update(digest).update(nonceEven).update(nonceOdd).update(Buffer.from([0])).digest();
  const body = new Marshal().bytes(params).u32(handle).bytes(nonceOdd).u8(0).bytes(auth);
  return Buffer.from(await tpm.execute(command(TAG_RQU_AUTH1, ordinal, body)));
}

/** TPM_TakeOwnership with OWNER_AUTH, an SRK of RSA 2048 (storage, auth always) with the same secret. */
export async function takeOwnership(tpm: Exec, ekModulus: Buffer): Promise<void> {
  const ek = crypto.createPublicKey({ key: { kty: 'RSA', n: ekModulus.toString('base64url'), e: 'AQAB' }, format: 'jwk' });
  const enc = (secret: Buffer): Buffer => crypto.publicEncrypt({ key: ek, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1', oaepLabel: Buffer.from('TCPA') }, secret);
  const encOwner = enc(OWNER_AUTH);
  const encSrk = enc(OWNER_AUTH);
  // TPM_KEY12: tag, fill, keyUsage STORAGE, keyFlags, authDataUsage ALWAYS, RSA/OAEP/no-sig 2048 bits,
  // no PCR info, empty public key and encrypted part (the TPM makes the SRK).
  const srk = new Marshal().u16(0x0028).u16(0).u16(0x0011).u32(0).u8(1).u32(1).u16(3).u16(1).u32(12).u32(2048).u32(2).u32(0).u32(0).u32(0).u32(0);
  const params = new Marshal().u16(5).u32(encOwner.length).bytes(encOwner).u32(encSrk.length).bytes(encSrk).bytes(srk.toBytes()).toBytes();
  const r = await ownerCommand(tpm, ORD_TakeOwnership, params);
  if (responseCode(r) !== 0) throw new Error(`TPM_TakeOwnership: rc 0x${responseCode(r).toString(16)}`);
}

/** TPM_NV_ReadValue as the owner; returns the response (rc at bytes 6..10, dataSize and data after). */
export function ownerNvRead(tpm: Exec, index: number, offset: number, size: number): Promise<Buffer> {
  return ownerCommand(tpm, TPM_ORD_NV_ReadValue, new Marshal().u32(index).u32(offset).u32(size).toBytes());
}

export function ownerNvWrite(tpm: Exec, index: number, offset: number, data: Uint8Array): Promise<Buffer> {
  return ownerCommand(tpm, TPM_ORD_NV_WriteValue, new Marshal().u32(index).u32(offset).u32(data.length).bytes(data).toBytes());
}

/** An index's whole content, read by the owner in pieces. */
export async function ownerNvReadAll(tpm: Exec, index: number, size: number, piece = 512): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < size; off += piece) {
    const r = await ownerNvRead(tpm, index, off, Math.min(piece, size - off));
    if (responseCode(r) !== 0) throw new Error(`TPM_NV_ReadValue 0x${index.toString(16)} at ${off}: rc 0x${responseCode(r).toString(16)}`);
    parts.push(r.subarray(14, 14 + r.readUInt32BE(10)));
  }
  return Buffer.concat(parts);
}

/** The index's size from TPM_GetCapability(TPM_CAP_NV_INDEX): TPM_NV_DATA_PUBLIC ends in dataSize. */
export async function nvIndexSize(tpm: Exec, index: number): Promise<{ size: number; permissions: number; bWriteDefine: number }> {
  const r = Buffer.from(await tpm.execute(command(TAG_RQU, 0x65, new Marshal().u32(0x11).u32(4).u32(index))));
  if (responseCode(r) !== 0) throw new Error(`TPM_GetCapability(TPM_CAP_NV_INDEX): rc 0x${responseCode(r).toString(16)}`);
  const pub = r.subarray(14, 14 + r.readUInt32BE(10));
  // tag 2, index 4, 2 × TPM_PCR_INFO_SHORT (2+3+1+20), TPM_NV_ATTRIBUTES (2+4), 3 bools, dataSize 4
  return { permissions: pub.readUInt32BE(60), bWriteDefine: pub[66]!, size: pub.readUInt32BE(pub.length - 4) };
}

/** TPM_NV_DefineSpace of `index` with size 0 (a delete), unauthorised. */
export function nvDelete(tpm: Exec, index: number): Promise<Uint8Array> {
  return tpm.execute(nvDefineSpace12(index, 0, 0));
}

