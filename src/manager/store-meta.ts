// The manager store's names and metadata record: blob file names by instance, kind and generation, and
// the metadata file (VTPMMETA magic, length, JSON record, HMAC-SHA256 under the store's MAC key).
import crypto from 'node:crypto';
import type { StateKind } from '../tpm/state-store.js';

export class StoreError extends Error {
  constructor(
    readonly code: 'META_TAMPERED' | 'META_FORMAT' | 'MISSING_BLOB' | 'IO' | 'STALE',
    message: string,
  ) {
    super(message);
    this.name = 'StoreError';
  }
}


export const BLOB_RE = /^i(\d+)\.(permanent|volatile|savestate)\.g(\d+)\.blob$/;

export function blobName(instance: number, kind: StateKind, generation: number): string {
  return `i${instance}.${kind}.g${generation}.blob`;
}

export function blobKey(instance: number, kind: StateKind): string {
  return `${instance}.${kind}`;
}

export function nameOf(k: string, generation: number): string {
  const [i, kind] = k.split('.') as [string, StateKind];
  return blobName(Number(i), kind, generation);
}

export interface MetaRecord {
  format: 2;
  /** Bumped on every checkpoint. */
  seq: number;
  /** Highest generation ever handed out; generations never repeat, even across a DELETE. */
  clock: number;
  /** "instance.kind" → generation of the live blob. */
  blobs: Record<string, number>;
  table: unknown;
  /**
   * The log generation whose records continue this checkpoint, then the one after it: generation g is
   * appended to half g % 2 of the log file, numbered from 1 at the start of that half.
   */
  walGen: number;
  /** Bytes per log half (so a log file cut short is still read at the right offsets). */
  walHalf: number;
}

const META_MAGIC = Buffer.from('VTPMMETA', 'ascii');

export function encodeMeta(m: MetaRecord, macKey: Buffer): Buffer {
  const json = Buffer.from(JSON.stringify(m));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(json.length);
  const body = Buffer.concat([META_MAGIC, len, json]);
  return Buffer.concat([body, crypto.createHmac('sha256', macKey).update(body).digest()]);
}

export function decodeMeta(b: Buffer, macKey: Buffer): MetaRecord {
  if (b.length < 8 + 4 + 32 || !b.subarray(0, 8).equals(META_MAGIC)) throw new StoreError('META_FORMAT', 'metadata file has no VTPMMETA header');
  const len = b.readUInt32BE(8);
  if (b.length !== 12 + len + 32) throw new StoreError('META_FORMAT', `metadata length ${b.length} does not match its header (${12 + len + 32})`);
  const body = b.subarray(0, 12 + len);
  const mac = crypto.createHmac('sha256', macKey).update(body).digest();
  if (!crypto.timingSafeEqual(mac, b.subarray(12 + len)))
    throw new StoreError('META_TAMPERED', 'metadata MAC does not verify (tampered, or a different master key)');
  const m = JSON.parse(body.subarray(12).toString('utf8')) as Omit<MetaRecord, 'format' | 'walGen' | 'walHalf'> & { format: number; walGen?: number; walHalf?: number };
  if ((m.format !== 1 && m.format !== 2) || typeof m.seq !== 'number' || typeof m.clock !== 'number' || typeof m.blobs !== 'object')
    throw new StoreError('META_FORMAT', 'metadata record is malformed');
  // Format 1 (before the log) has no log generation: nothing to replay.
  if (m.format === 2 && (typeof m.walGen !== 'number' || typeof m.walHalf !== 'number')) throw new StoreError('META_FORMAT', 'metadata record has no log generation');
  return { ...m, format: 2, walGen: m.walGen ?? 0, walHalf: m.walHalf ?? 0 };
}
