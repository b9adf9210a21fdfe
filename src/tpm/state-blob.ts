// The state-blob format of swtpm's CMD_GET_STATEBLOB / CMD_SET_STATEBLOB (swtpm_nvstore.c, tlv.h),
// unencrypted, so a TPM can move between a swtpm process and this engine:
//
//   blobheader (10 bytes, packed, big-endian):
//     version u8 = 2, min_version u8 = 1, hdrsize u16 = 10, flags u16, totlen u32 (header included)
//   TLV { tag u16 = 4 TAG_MIGRATION_DATA, length u32,
//         TLV { tag u16 = 1 TAG_DATA, length u32, <the bytes libtpms stored under that name> } }
//
// flags is BLOB_FLAG_MIGRATION_DATA (4) for an unencrypted blob. Version-1 blobs carry the plain bytes
// right after the header. Encrypted blobs (state or migration key) need a key we do not hold: refused.
import type { StateKind } from './state-store.js';

export const BLOB_HEADER_VERSION = 2;
export const BLOB_HEADER_SIZE = 10;
export const BLOB_FLAG_ENCRYPTED = 0x01;
export const BLOB_FLAG_MIGRATION_ENCRYPTED = 0x02;
export const BLOB_FLAG_MIGRATION_DATA = 0x04;
export const TAG_DATA = 1;
export const TAG_MIGRATION_DATA = 4;
const TLV_HEADER_SIZE = 6;

/** swtpm's PTM_BLOB_TYPE_* numbers for each kind (ctrl protocol), and libtpms' nvram names. */
export const BLOB_TYPE: Record<StateKind, number> = { permanent: 1, volatile: 2, savestate: 3 };
export const NVRAM_NAME: Record<StateKind, string> = {
  permanent: 'permall',
  volatile: 'volatilestate',
  savestate: 'savestate',
};

export function kindForNvramName(name: string): StateKind | null {
  switch (name) {
    case 'permall':
      return 'permanent';
    case 'volatilestate':
      return 'volatile';
    case 'savestate':
      return 'savestate';
    default:
      return null;
  }
}

export type StateBlobErrorCode = 'SHORT' | 'TOTLEN' | 'VERSION' | 'HDRSIZE' | 'ENCRYPTED' | 'NO_DATA_TAG' | 'TLV_OVERRUN';

export class StateBlobError extends Error {
  constructor(
    readonly code: StateBlobErrorCode,
    message: string,
  ) {
    super(`state blob: ${message}`);
    this.name = 'StateBlobError';
  }
}

/** Wrap libtpms' bytes the way swtpm's GET_STATEBLOB returns them with state_flags DECRYPTED. */
export function encodeStateBlob(plain: Uint8Array): Uint8Array {
  const inner = TLV_HEADER_SIZE + plain.length;
  const total = BLOB_HEADER_SIZE + TLV_HEADER_SIZE + inner;
  const out = new Uint8Array(total);
  const v = new DataView(out.buffer);
  v.setUint8(0, BLOB_HEADER_VERSION);
  v.setUint8(1, 1);
  v.setUint16(2, BLOB_HEADER_SIZE);
  v.setUint16(4, BLOB_FLAG_MIGRATION_DATA);
  v.setUint32(6, total);
  v.setUint16(10, TAG_MIGRATION_DATA);
  v.setUint32(12, inner);
  v.setUint16(16, TAG_DATA);
  v.setUint32(18, plain.length);
  out.set(plain, 22);
  return out;
}

/**
 * The libtpms bytes inside a blob; null for an empty blob (which SET_STATEBLOB takes as "clear").
 * Checks in swtpm's order: header length, totlen, min_version, hdrsize, then the TLVs.
 */
export function decodeStateBlob(blob: Uint8Array): Uint8Array | null {
  if (blob.length === 0) return null;
  if (blob.length < BLOB_HEADER_SIZE) throw new StateBlobError('SHORT', `${blob.length} bytes, header needs 10`);
  const v = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  const version = v.getUint8(0);
  const minVersion = v.getUint8(1);
  const hdrsize = v.getUint16(2);
  const flags = v.getUint16(4);
  const totlen = v.getUint32(6);
  if (totlen !== blob.length) throw new StateBlobError('TOTLEN', `totlen ${totlen} but ${blob.length} bytes`);
  if (minVersion > BLOB_HEADER_VERSION) {
    throw new StateBlobError('VERSION', `needs version ${minVersion}, we read up to ${BLOB_HEADER_VERSION}`);
  }
  if (hdrsize !== BLOB_HEADER_SIZE) throw new StateBlobError('HDRSIZE', `hdrsize ${hdrsize} != 10`);
  if (flags & (BLOB_FLAG_ENCRYPTED | BLOB_FLAG_MIGRATION_ENCRYPTED)) {
    throw new StateBlobError('ENCRYPTED', `flags 0x${flags.toString(16)}: encrypted blobs need swtpm's key`);
  }
  const body = blob.subarray(BLOB_HEADER_SIZE);
  if (body.length === 0) return null;
  if (version === 1) return body.slice();
  const migration = findTag(body, TAG_MIGRATION_DATA);
  return findTag(migration, TAG_DATA).slice();
}

function findTag(buf: Uint8Array, tag: number): Uint8Array {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let off = 0;
  while (off < buf.length) {
    if (off + TLV_HEADER_SIZE > buf.length) throw new StateBlobError('TLV_OVERRUN', `truncated TLV header at ${off}`);
    const t = v.getUint16(off);
    const len = v.getUint32(off + 2);
    off += TLV_HEADER_SIZE;
    if (off + len > buf.length) throw new StateBlobError('TLV_OVERRUN', `TLV tag ${t} length ${len} overruns`);
    if (t === tag) return buf.subarray(off, off + len);
    off += len;
  }
  throw new StateBlobError('NO_DATA_TAG', `no TLV with tag ${tag}`);
}
