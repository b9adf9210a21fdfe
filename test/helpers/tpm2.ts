// Hand-built TPM 2.0 commands for tests (big-endian, TCG Part 3 layouts).
export const TPM2_CC_Startup = 0x144;
export const TPM2_CC_GetRandom = 0x17b;
export const TPM2_CC_PCR_Extend = 0x182;
export const TPM2_CC_PCR_Read = 0x17e;
export const TPM_ALG_SHA256 = 0x000b;
export const TPM_RS_PW = 0x40000009;

function command(tag: number, cc: number, body: Buffer): Uint8Array {
  const h = Buffer.alloc(10);
  h.writeUInt16BE(tag, 0);
  h.writeUInt32BE(10 + body.length, 2);
  h.writeUInt32BE(cc, 6);
  return new Uint8Array(Buffer.concat([h, body]));
}

export function getRandom(n: number): Uint8Array {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return command(0x8001, TPM2_CC_GetRandom, b);
}

export function startupClear(): Uint8Array {
  return command(0x8001, TPM2_CC_Startup, Buffer.from([0, 0]));
}

/** PCR_Extend of one SHA-256 digest with an empty password session. */
export function pcrExtend(pcr: number, digest: Uint8Array): Uint8Array {
  const b = Buffer.alloc(4 + 4 + 9 + 4 + 2 + 32);
  let o = b.writeUInt32BE(pcr, 0);
  o = b.writeUInt32BE(9, o);
  o = b.writeUInt32BE(TPM_RS_PW, o);
  o = b.writeUInt16BE(0, o);
  o = b.writeUInt8(0, o);
  o = b.writeUInt16BE(0, o);
  o = b.writeUInt32BE(1, o);
  o = b.writeUInt16BE(TPM_ALG_SHA256, o);
  Buffer.from(digest).copy(b, o);
  return command(0x8002, TPM2_CC_PCR_Extend, b);
}

export function pcrRead(pcr: number): Uint8Array {
  const sel = Buffer.alloc(3);
  sel[pcr >> 3] = 1 << (pcr & 7);
  const b = Buffer.concat([Buffer.from([0, 0, 0, 1, 0, 0x0b, 3]), sel]);
  return command(0x8001, TPM2_CC_PCR_Read, b);
}

/** The first digest of a PCR_Read response. */
export function pcrReadDigest(rsp: Uint8Array): Buffer {
  const b = Buffer.from(rsp);
  // header 10, updateCounter 4, TPML_PCR_SELECTION (4 + 2 + 1 + 3), TPML_DIGEST count 4, size 2
  const o = 10 + 4 + 10 + 4;
  const size = b.readUInt16BE(o);
  return b.subarray(o + 2, o + 2 + size);
}

export function rc(rsp: Uint8Array): number {
  return Buffer.from(rsp).readUInt32BE(6);
}
