// TPM 2.0 commands the engine itself issues (startup, shutdown) and the ones tests, benchmarks and the
// demo need, with their response parsers. Byte layouts follow TPM 2.0 Part 3; authorisation is always
// a password session with an empty password (TPM_RS_PW), which is what a fresh TPM's hierarchies take.
import { Marshal, TPM2_ST_NO_SESSIONS, TPM2_ST_SESSIONS, command, readHeader } from './wire.js';

export const TPM_CC_EvictControl = 0x120;
export const TPM_CC_NV_DefineSpace = 0x12a;
export const TPM_CC_CreatePrimary = 0x131;
export const TPM_CC_NV_Write = 0x137;
export const TPM_CC_Startup = 0x144;
export const TPM_CC_Shutdown = 0x145;
export const TPM_CC_NV_Read = 0x14e;
export const TPM_CC_GetCapability = 0x17a;
export const TPM_CC_GetRandom = 0x17b;
export const TPM_CC_PCR_Read = 0x17e;
export const TPM_CC_PCR_Extend = 0x182;

export const TPM_SU_CLEAR = 0x0000;
export const TPM_SU_STATE = 0x0001;
export const TPM_RH_OWNER = 0x40000001;
export const TPM_RS_PW = 0x40000009;
export const TPM_ALG_SHA256 = 0x000b;
export const TPM_ALG_RSA = 0x0001;
export const TPM_ALG_AES = 0x0006;
export const TPM_ALG_CFB = 0x0043;
export const TPM_ALG_NULL = 0x0010;
export const TPM_CAP_HANDLES = 0x00000001;
export const PERSISTENT_FIRST = 0x81000000;

/** Authorisation area with one empty-password session. */
function pwAuth(m: Marshal): Marshal {
  return m.u32(9).u32(TPM_RS_PW).u16(0).u8(0).u16(0);
}

export function startup(type: number = TPM_SU_CLEAR): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_Startup, new Marshal().u16(type));
}

export function shutdown(type: number = TPM_SU_CLEAR): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_Shutdown, new Marshal().u16(type));
}

export function getRandom(bytes: number): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_GetRandom, new Marshal().u16(bytes));
}

export function pcrExtendSha256(pcr: number, digest: Uint8Array): Uint8Array {
  if (digest.length !== 32) throw new RangeError('SHA-256 digest must be 32 bytes');
  const m = new Marshal().u32(pcr);
  pwAuth(m);
  m.u32(1).u16(TPM_ALG_SHA256).bytes(digest);
  return command(TPM2_ST_SESSIONS, TPM_CC_PCR_Extend, m);
}

/** PCR_Read of one SHA-256 PCR (0..23). */
export function pcrReadSha256(pcr: number): Uint8Array {
  const select = [0, 0, 0];
  select[pcr >> 3] = 1 << (pcr & 7);
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_PCR_Read, new Marshal().u32(1).u16(TPM_ALG_SHA256).u8(3).bytes(select));
}

/** The one digest a PCR_Read of a single PCR returns. */
export function parsePcrRead(resp: Uint8Array): Uint8Array {
  expectSuccess(resp, 'PCR_Read');
  const v = view(resp);
  // header 10, pcrUpdateCounter 4, TPML_PCR_SELECTION {count 4, hash 2, sizeofSelect 1, select n}
  let off = 14;
  const selCount = v.getUint32(off);
  off += 4;
  for (let i = 0; i < selCount; i++) off += 3 + v.getUint8(off + 2);
  const count = v.getUint32(off);
  off += 4;
  if (count !== 1) throw new Error(`PCR_Read returned ${count} digests`);
  const size = v.getUint16(off);
  return resp.slice(off + 2, off + 2 + size);
}

export function parseGetRandom(resp: Uint8Array): Uint8Array {
  expectSuccess(resp, 'GetRandom');
  const size = view(resp).getUint16(10);
  return resp.slice(12, 12 + size);
}

/**
 * CreatePrimary of an RSA storage key (restricted decrypt, AES-128-CFB) under the owner hierarchy.
 * `unique` goes into the template's unique field: a different value derives a different key (libtpms
 * caches primary keys by template, so only a new template costs a real key generation).
 */
export function createPrimaryRsa(keyBits: number, unique: Uint8Array = new Uint8Array(0)): Uint8Array {
  const pub = new Marshal()
    .u16(TPM_ALG_RSA)
    .u16(TPM_ALG_SHA256)
    // fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | decrypt
    .u32(0x00030072)
    .u16(0)
    .u16(TPM_ALG_AES)
    .u16(128)
    .u16(TPM_ALG_CFB)
    .u16(TPM_ALG_NULL)
    .u16(keyBits)
    .u32(0)
    .tpm2b(unique)
    .toBytes();
  const m = new Marshal().u32(TPM_RH_OWNER);
  pwAuth(m);
  m.u16(4).u16(0).u16(0); // TPM2B_SENSITIVE_CREATE: empty userAuth and data
  m.tpm2b(pub);
  m.u16(0); // outsideInfo
  m.u32(0); // creationPCR: none
  return command(TPM2_ST_SESSIONS, TPM_CC_CreatePrimary, m);
}

/** The transient object handle a CreatePrimary response returns. */
export function parseCreatePrimaryHandle(resp: Uint8Array): number {
  expectSuccess(resp, 'CreatePrimary');
  return view(resp).getUint32(10);
}

export function evictControl(objectHandle: number, persistentHandle: number): Uint8Array {
  const m = new Marshal().u32(TPM_RH_OWNER).u32(objectHandle);
  pwAuth(m);
  m.u32(persistentHandle);
  return command(TPM2_ST_SESSIONS, TPM_CC_EvictControl, m);
}

/** An owner-readable/writable ordinary NV index of `size` bytes with an empty auth value. */
export function nvDefineSpace(index: number, size: number): Uint8Array {
  // OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD
  const nvPublic = new Marshal().u32(index).u16(TPM_ALG_SHA256).u32(0x00060006).u16(0).u16(size).toBytes();
  const m = new Marshal().u32(TPM_RH_OWNER);
  pwAuth(m);
  m.u16(0).tpm2b(nvPublic);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_DefineSpace, m);
}

export function nvWrite(index: number, data: Uint8Array, offset = 0): Uint8Array {
  const m = new Marshal().u32(TPM_RH_OWNER).u32(index);
  pwAuth(m);
  m.tpm2b(data).u16(offset);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_Write, m);
}

export function nvRead(index: number, size: number, offset = 0): Uint8Array {
  const m = new Marshal().u32(TPM_RH_OWNER).u32(index);
  pwAuth(m);
  m.u16(size).u16(offset);
  return command(TPM2_ST_SESSIONS, TPM_CC_NV_Read, m);
}

export function parseNvRead(resp: Uint8Array): Uint8Array {
  expectSuccess(resp, 'NV_Read');
  // header 10, parameterSize 4, TPM2B_MAX_NV_BUFFER
  const size = view(resp).getUint16(14);
  return resp.slice(16, 16 + size);
}

/** GetCapability(TPM_CAP_HANDLES) from `first`, up to `count` handles. */
export function getHandles(first = PERSISTENT_FIRST, count = 64): Uint8Array {
  return command(TPM2_ST_NO_SESSIONS, TPM_CC_GetCapability, new Marshal().u32(TPM_CAP_HANDLES).u32(first).u32(count));
}

export function parseHandles(resp: Uint8Array): number[] {
  expectSuccess(resp, 'GetCapability');
  const v = view(resp);
  // header 10, moreData 1, capability 4, TPML_HANDLE {count 4, handles}
  const count = v.getUint32(15);
  const out: number[] = [];
  for (let i = 0; i < count; i++) out.push(v.getUint32(19 + 4 * i));
  return out;
}

export class TpmResponseError extends Error {
  constructor(
    readonly what: string,
    readonly rc: number,
  ) {
    super(`${what} failed with TPM response code 0x${rc.toString(16)}`);
    this.name = 'TpmResponseError';
  }
}

export function expectSuccess(resp: Uint8Array, what: string): void {
  const h = readHeader(resp);
  if (!h) throw new TpmResponseError(what, -1);
  if (h.code !== 0) throw new TpmResponseError(what, h.code);
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
