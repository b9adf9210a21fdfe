// The on-disk format of DirStateStore (dir-store.ts): one file per (instance, kind) holding two
// fixed-size slots, written alternately, so an update is one in-place write and one fdatasync.
//
//   file  = slot 0 | slot 1, each `cap` bytes (cap a multiple of 4096, so a slot never shares a
//           filesystem block, or a disk sector, with the other one and a torn write stays inside it)
//   slot  = header (64 bytes) | payload (length bytes) | unused up to cap
//   header, little-endian:
//     0  magic "vTPMslot"     8  u16 format version = 1   10 u8 type (1 SPARE, 2 BLOB)
//     11 u8 kind (0 none, 1 permanent, 2 volatile, 3 savestate)   12 u32 cap
//     16 u64 seq   24 u64 instance   32 u32 payload length
//     36 u32 CRC-32 (zlib) over header bytes 0..35 then the payload   40..63 zero
//
// A record is valid when magic, version, cap and length fit and the CRC matches; the newest valid
// record (highest seq) is the file's content. A writer only ever overwrites the slot that does NOT hold
// the newest valid record, and every file is born with one valid record (written and synced before the
// file is used), so a crash at any moment leaves the last acknowledged record readable: a torn write
// fails its CRC and the other slot wins. A SPARE record is a file made ahead of time that belongs to no
// instance yet (DirStateStore's spare files); as the newest record of a named file it means "no state".
//
// Files of the first format (the raw libtpms blob, written by rename) carry no magic in either slot
// position: parseSlotFile() reports them as `legacy` so they still load.
import { crc32 } from 'node:zlib';
import { STATE_KINDS, type StateKind } from './state-store.js';

export const SLOT_MAGIC = Buffer.from('vTPMslot', 'latin1');
export const SLOT_FORMAT_VERSION = 1;
export const SLOT_HEADER_SIZE = 64;
/** Slots are whole filesystem blocks. */
export const SLOT_ALIGN = 4096;
/** Slot size of a spare file: a new TPM 2.0's permanent state is ~1.3 KB, volatile state ~7 KB. */
export const DEFAULT_SLOT_CAP = 16384;
/** Nothing libtpms stores comes near this (its NV is < 128 KiB); a bigger cap means a bad header. */
export const MAX_SLOT_CAP = 16 * 1024 * 1024;

export const RecordType = { SPARE: 1, BLOB: 2 } as const;
export type RecordType = (typeof RecordType)[keyof typeof RecordType];

const KIND_CODE: Record<StateKind, number> = { permanent: 1, volatile: 2, savestate: 3 };

export type SlotFileErrorCode = 'CORRUPT' | 'IDENTITY' | 'SIZE';

export class SlotFileError extends Error {
  constructor(
    readonly code: SlotFileErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'SlotFileError';
  }
}

export interface SlotRecord {
  type: RecordType;
  /** null for a SPARE record. */
  kind: StateKind | null;
  instance: number;
  seq: bigint;
  payload: Uint8Array;
}

export interface SlotFileContent {
  cap: number;
  /** Index (0 or 1) of the slot holding the newest valid record. */
  slot: 0 | 1;
  record: SlotRecord;
}

export type ParsedFile = { format: 'slots'; content: SlotFileContent } | { format: 'legacy'; blob: Uint8Array };

/** The smallest slot capacity that holds `payloadLength` bytes, with a quarter to spare for growth. */
export function capFor(payloadLength: number): number {
  const want = SLOT_HEADER_SIZE + payloadLength + (payloadLength >> 2);
  return Math.max(DEFAULT_SLOT_CAP, Math.ceil(want / SLOT_ALIGN) * SLOT_ALIGN);
}

/** One record, header and payload, ready to be written at the start of a slot of `cap` bytes. */
export function encodeRecord(
  cap: number,
  r: { type: RecordType; kind: StateKind | null; instance: number; seq: bigint; payload: Uint8Array },
): Uint8Array {
  if (SLOT_HEADER_SIZE + r.payload.length > cap) {
    throw new SlotFileError('SIZE', `record of ${r.payload.length} bytes does not fit a ${cap}-byte slot`);
  }
  const out = Buffer.alloc(SLOT_HEADER_SIZE + r.payload.length);
  SLOT_MAGIC.copy(out, 0);
  out.writeUInt16LE(SLOT_FORMAT_VERSION, 8);
  out.writeUInt8(r.type, 10);
  out.writeUInt8(r.kind ? KIND_CODE[r.kind] : 0, 11);
  out.writeUInt32LE(cap, 12);
  out.writeBigUInt64LE(r.seq, 16);
  out.writeBigUInt64LE(BigInt(r.instance), 24);
  out.writeUInt32LE(r.payload.length, 32);
  out.set(r.payload, SLOT_HEADER_SIZE);
  out.writeUInt32LE(crc32(r.payload, crc32(out.subarray(0, 36))), 36);
  return out;
}

/** A whole new file of two `cap`-byte slots: the record in slot 0, slot 1 zeros (written, not holes). */
export function encodeFile(cap: number, first: Parameters<typeof encodeRecord>[1]): Uint8Array {
  const file = new Uint8Array(2 * cap);
  file.set(encodeRecord(cap, first), 0);
  return file;
}

type SlotCheck = { ok: true; record: SlotRecord } | { ok: false; magic: boolean; why: string };

function checkSlot(file: Uint8Array, slot: number, cap: number): SlotCheck {
  const b = Buffer.from(file.buffer, file.byteOffset + slot * cap, cap);
  if (!b.subarray(0, 8).equals(SLOT_MAGIC)) return { ok: false, magic: false, why: 'no magic' };
  const version = b.readUInt16LE(8);
  if (version !== SLOT_FORMAT_VERSION) return { ok: false, magic: true, why: `format version ${version}` };
  const type = b.readUInt8(10);
  const kindCode = b.readUInt8(11);
  const slotCap = b.readUInt32LE(12);
  const length = b.readUInt32LE(32);
  if (slotCap !== cap) return { ok: false, magic: true, why: `header says slot size ${slotCap}, file has ${cap}` };
  if (length > cap - SLOT_HEADER_SIZE) return { ok: false, magic: true, why: `length ${length} overruns the slot` };
  const payload = b.subarray(SLOT_HEADER_SIZE, SLOT_HEADER_SIZE + length);
  const want = b.readUInt32LE(36);
  const got = crc32(payload, crc32(b.subarray(0, 36)));
  if (want !== got) return { ok: false, magic: true, why: `checksum mismatch (stored 0x${want.toString(16)}, computed 0x${got.toString(16)})` };
  const kind = kindCode === 0 ? null : (STATE_KINDS[kindCode - 1] ?? undefined);
  if (kind === undefined || (type !== RecordType.SPARE && type !== RecordType.BLOB) || (type === RecordType.BLOB) !== (kind !== null)) {
    return { ok: false, magic: true, why: `bad record type ${type} / kind ${kindCode}` };
  }
  const instance = b.readBigUInt64LE(24);
  if (instance > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, magic: true, why: `instance ${instance} out of range` };
  return { ok: true, record: { type: type as RecordType, kind, instance: Number(instance), seq: b.readBigUInt64LE(16), payload: new Uint8Array(payload) } };
}

/**
 * What a state file holds: the newest valid record of a slot file, or the bytes of a first-format
 * file. Throws SlotFileError('CORRUPT') for a slot file whose slots all fail their checks (never a
 * state DirStateStore leaves behind, even after a crash: the disk or someone else damaged it).
 */
export function parseSlotFile(file: Uint8Array, name: string): ParsedFile {
  const cap = file.length / 2;
  const geometry = Number.isInteger(cap) && cap >= SLOT_ALIGN && cap % SLOT_ALIGN === 0 && cap <= MAX_SLOT_CAP;
  const startsWithMagic = file.length >= 8 && Buffer.from(file.buffer, file.byteOffset, 8).equals(SLOT_MAGIC);
  if (!geometry) {
    if (startsWithMagic) throw new SlotFileError('CORRUPT', `${name}: a slot file of ${file.length} bytes (not two slots of a multiple of ${SLOT_ALIGN})`);
    return { format: 'legacy', blob: file };
  }
  const checks = [checkSlot(file, 0, cap), checkSlot(file, 1, cap)] as const;
  if (checks.every((c) => !c.ok && !c.magic)) return { format: 'legacy', blob: file };
  let best: SlotFileContent | null = null;
  checks.forEach((c, i) => {
    if (c.ok && (!best || c.record.seq > best.record.seq)) best = { cap, slot: i as 0 | 1, record: c.record };
  });
  if (!best) {
    const why = checks.map((c, i) => `slot ${i}: ${c.ok ? 'ok' : c.why}`).join('; ');
    throw new SlotFileError('CORRUPT', `${name}: no slot holds a valid record (${why})`);
  }
  return { format: 'slots', content: best };
}

/** The state a named file holds for (instance, kind): the blob, or null for a spare never written. */
export function stateOf(content: SlotFileContent, instance: number, kind: StateKind, name: string): Uint8Array | null {
  const r = content.record;
  if (r.type === RecordType.SPARE) return null;
  if (r.instance !== instance || r.kind !== kind) {
    throw new SlotFileError('IDENTITY', `${name}: holds the ${r.kind} state of instance ${r.instance}, not ${kind} of ${instance}`);
  }
  return r.payload;
}
