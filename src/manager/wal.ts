// The manager's write-ahead log: one record per group commit, appended to a pre-zeroed file with one
// pwrite + one fdatasync, which is what makes a save durable between checkpoints (store.ts).
//
//   record  = magic "VWAL" or "VWAP" | body length u32 | body | HMAC-SHA256(magic ‖ length ‖ body)
//   body    = log generation u64 | seq u64 | clock u64 | saves u32 | removes u32 | table length u32
//             | ("VWAP" only) appends u32
//             | saves:   instance u32 | kind u8 | generation u64 | length u32 | sealed blob
//             | removes: instance u32 | kind u8
//             | appends: instance u32 | kind u8 | onto generation u64 | generation u64 | length u32 | sealed piece
//             | table JSON (table length bytes; 0xFFFFFFFF = the table did not change)
//   all big-endian. Generation g's records follow each other from the start of half g % 2 of the file,
//   numbered 1, 2, …
//
// Replay (store.ts: the generation the checkpoint metadata names, then the next) takes records of
// exactly the generation asked for, numbered from 1 with no gap, and stops at the first that is not: zeros (the end), a torn record (length past the file,
// MAC fails), garbage, a record of an earlier generation left behind (the file is reused, never
// truncated) or one out of sequence. The MAC key is derived from the metadata key, so a forged record
// stops replay too. Blobs in the log are the sealed envelopes (seal.ts), never plaintext state.
import crypto from 'node:crypto';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { KIND_CODES } from './wire.js';

export const WAL_FILE = 'wal';
/** Default log size: two halves of 8 MiB, ~900 saves of a 9 KiB volatile blob each. */
export const DEFAULT_WAL_BYTES = 16 * 1024 * 1024;
const MAGIC = 0x5657414c; // "VWAL"
/** A record with appended pieces: a records count follows the fixed part (records without keep "VWAL"). */
const MAGIC_APPENDS = 0x56574150; // "VWAP"
const HEAD = 8;
const MAC = 32;
const FIXED = 8 + 8 + 8 + 4 + 4 + 4;
const SAVE_HEAD = 4 + 1 + 8 + 4;
const REMOVE_BYTES = 4 + 1;
const APPEND_HEAD = 4 + 1 + 8 + 8 + 4;
const NO_TABLE = 0xffffffff;

export class WalError extends Error {
  constructor(
    readonly code: 'FORMAT',
    message: string,
  ) {
    super(message);
    this.name = 'WalError';
  }
}

export interface WalSave {
  instance: number;
  kind: StateKind;
  generation: number;
  data: Uint8Array;
}

/** Sealed bytes appended to the blob of (instance, kind) whose generation is `onto`; the blob's generation becomes `generation`. */
export interface WalAppend {
  instance: number;
  kind: StateKind;
  onto: number;
  generation: number;
  data: Uint8Array;
}

export interface WalRecord {
  gen: number;
  seq: number;
  /** The store's generation clock when the record was written (reservations included). */
  clock: number;
  saves: WalSave[];
  removes: Array<{ instance: number; kind: StateKind }>;
  /** Applied after the saves and removes of the same record; absent: none. */
  appends?: WalAppend[];
  /** The VM table after this commit; undefined: unchanged since the previous record or checkpoint. */
  table?: unknown;
}

/** The log's MAC key: its own, derived from the metadata key, so a log record never verifies as metadata. */
export function walKey(metaKey: Buffer): Buffer {
  return Buffer.from(crypto.hkdfSync('sha256', metaKey, Buffer.alloc(0), Buffer.from('vtpm-split wal v1', 'ascii'), 32));
}

export function encodeRecord(r: WalRecord, key: Buffer): Buffer {
  const table = r.table === undefined ? null : Buffer.from(JSON.stringify(r.table));
  const appends = r.appends ?? [];
  const withAppends = appends.length > 0;
  let body = FIXED + (withAppends ? 4 : 0) + r.removes.length * REMOVE_BYTES + (table?.length ?? 0);
  for (const s of r.saves) body += SAVE_HEAD + s.data.length;
  for (const a of appends) body += APPEND_HEAD + a.data.length;
  const out = Buffer.allocUnsafe(HEAD + body + MAC);
  out.writeUInt32BE(withAppends ? MAGIC_APPENDS : MAGIC, 0);
  out.writeUInt32BE(body, 4);
  let o = HEAD;
  out.writeBigUInt64BE(BigInt(r.gen), o);
  out.writeBigUInt64BE(BigInt(r.seq), o + 8);
  out.writeBigUInt64BE(BigInt(r.clock), o + 16);
  out.writeUInt32BE(r.saves.length, o + 24);
  out.writeUInt32BE(r.removes.length, o + 28);
  out.writeUInt32BE(table ? table.length : NO_TABLE, o + 32);
  o += FIXED;
  if (withAppends) (out.writeUInt32BE(appends.length, o), (o += 4));
  for (const s of r.saves) {
    out.writeUInt32BE(s.instance >>> 0, o);
    out.writeUInt8(KIND_CODES[s.kind], o + 4);
    out.writeBigUInt64BE(BigInt(s.generation), o + 5);
    out.writeUInt32BE(s.data.length, o + 13);
    out.set(s.data, o + SAVE_HEAD);
    o += SAVE_HEAD + s.data.length;
  }
  for (const x of r.removes) {
    out.writeUInt32BE(x.instance >>> 0, o);
    out.writeUInt8(KIND_CODES[x.kind], o + 4);
    o += REMOVE_BYTES;
  }
  for (const a of appends) {
    out.writeUInt32BE(a.instance >>> 0, o);
    out.writeUInt8(KIND_CODES[a.kind], o + 4);
    out.writeBigUInt64BE(BigInt(a.onto), o + 5);
    out.writeBigUInt64BE(BigInt(a.generation), o + 13);
    out.writeUInt32BE(a.data.length, o + 21);
    out.set(a.data, o + APPEND_HEAD);
    o += APPEND_HEAD + a.data.length;
  }
  if (table) (table.copy(out, o), (o += table.length));
  crypto.createHmac('sha256', key).update(out.subarray(0, o)).digest().copy(out, o);
  return out;
}

export type ReadResult = { record: WalRecord; next: number } | { stop: string };

/**
 * The record at `off` if it is the one replay expects next (generation `gen`, number `seq`), else why
 * replay stops there. Every length is checked against what is left of the buffer before it is used.
 */
export function readRecord(log: Buffer, off: number, key: Buffer, gen: number, seq: number): ReadResult {
  if (off + HEAD > log.length) return { stop: 'end of the log file' };
  const magic = log.readUInt32BE(off);
  if (magic === 0 && log.readUInt32BE(off + 4) === 0) return { stop: 'zeros (end of the records)' };
  if (magic !== MAGIC && magic !== MAGIC_APPENDS) return { stop: `no record magic at offset ${off} (garbage or a torn record)` };
  const body = log.readUInt32BE(off + 4);
  const fixed = FIXED + (magic === MAGIC_APPENDS ? 4 : 0);
  if (body < fixed || off + HEAD + body + MAC > log.length) return { stop: `record at offset ${off} claims ${body} bytes, more than the file holds (torn)` };
  const end = off + HEAD + body;
  const mac = crypto.createHmac('sha256', key).update(log.subarray(off, end)).digest();
  if (!crypto.timingSafeEqual(mac, log.subarray(end, end + MAC))) return { stop: `record at offset ${off} fails its MAC (torn or forged)` };
  let o = off + HEAD;
  const rgen = Number(log.readBigUInt64BE(o));
  const rseq = Number(log.readBigUInt64BE(o + 8));
  if (rgen !== gen) return { stop: `record at offset ${off} belongs to log generation ${rgen}, not ${gen} (left from before a checkpoint)` };
  if (rseq !== seq) return { stop: `record at offset ${off} is number ${rseq}, expected ${seq}` };
  const clock = Number(log.readBigUInt64BE(o + 16));
  const nSaves = log.readUInt32BE(o + 24);
  const nRemoves = log.readUInt32BE(o + 28);
  const tableLen = log.readUInt32BE(o + 32);
  const nAppends = magic === MAGIC_APPENDS ? log.readUInt32BE(o + FIXED) : 0;
  o += fixed;
  // A record that verifies was written by us; a malformed one is a bug, not damage: say so loudly.
  const need = (n: number, what: string): void => {
    if (o + n > end) throw new WalError('FORMAT', `log record ${gen}/${seq} at offset ${off}: ${what} runs past the record`);
  };
  const kindOf = (code: number): StateKind => {
    const k = STATE_KINDS[code];
    if (k === undefined) throw new WalError('FORMAT', `log record ${gen}/${seq}: kind code ${code}`);
    return k;
  };
  const saves: WalSave[] = [];
  for (let i = 0; i < nSaves; i++) {
    need(SAVE_HEAD, 'a save header');
    const instance = log.readUInt32BE(o);
    const kind = kindOf(log[o + 4]!);
    const generation = Number(log.readBigUInt64BE(o + 5));
    const len = log.readUInt32BE(o + 13);
    o += SAVE_HEAD;
    need(len, 'a blob');
    // A copy: the caller keeps blobs in memory, the log buffer is dropped.
    saves.push({ instance, kind, generation, data: Buffer.from(log.subarray(o, o + len)) });
    o += len;
  }
  const removes: WalRecord['removes'] = [];
  for (let i = 0; i < nRemoves; i++) {
    need(REMOVE_BYTES, 'a remove');
    removes.push({ instance: log.readUInt32BE(o), kind: kindOf(log[o + 4]!) });
    o += REMOVE_BYTES;
  }
  const appends: WalAppend[] = [];
  for (let i = 0; i < nAppends; i++) {
    need(APPEND_HEAD, 'an append header');
    const instance = log.readUInt32BE(o);
    const kind = kindOf(log[o + 4]!);
    const onto = Number(log.readBigUInt64BE(o + 5));
    const generation = Number(log.readBigUInt64BE(o + 13));
    const len = log.readUInt32BE(o + 21);
    o += APPEND_HEAD;
    need(len, 'an appended piece');
    appends.push({ instance, kind, onto, generation, data: Buffer.from(log.subarray(o, o + len)) });
    o += len;
  }
  let table: unknown;
  if (tableLen !== NO_TABLE) {
    need(tableLen, 'the table');
    table = JSON.parse(log.subarray(o, o + tableLen).toString('utf8'));
    o += tableLen;
  }
  if (o !== end) throw new WalError('FORMAT', `log record ${gen}/${seq} at offset ${off}: ${end - o} bytes left over`);
  return { record: { gen, seq, clock, saves, removes, ...(appends.length > 0 ? { appends } : {}), table }, next: end + MAC };
}

/** Every record replay accepts, in order, and why it stopped. */
export function replay(log: Buffer, key: Buffer, gen: number): { records: WalRecord[]; end: number; stop: string } {
  const records: WalRecord[] = [];
  let off = 0;
  for (;;) {
    const r = readRecord(log, off, key, gen, records.length + 1);
    if ('stop' in r) return { records, end: off, stop: r.stop };
    records.push(r.record);
    off = r.next;
  }
}

/** Where records are appended: positioned writes that are durable (fdatasync'd) when they return. */
export interface AppendLog {
  readonly size: number;
  writeSync(data: Uint8Array, position: number): void;
  write(data: Uint8Array, position: number): Promise<void>;
  close(): void;
}
