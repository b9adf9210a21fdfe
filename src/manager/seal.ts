// Keys and blob protection. The master key never leaves the manager: it is kept in a 0600 file, or
// sealed to PCRs of a host TPM through tpm2-tools. Each vTPM instance gets its own key derived from it
// (HKDF-SHA256, bound to instance id and VM uuid); every blob is AES-256-GCM encrypted with an AAD
// naming instance, VM uuid, blob kind and generation, so a blob cannot be decrypted as another
// instance's, another kind, or an older generation (rollback), and any edited byte fails the tag.
// Format 2 encrypts each blob under its own key, derived from the instance key and a random 128-bit
// salt, so no (key, nonce) pair is used twice however many blobs an instance seals and whether or not a
// generation is ever reused (docs/manager.md, "Sealing"); format 1 (one key, random 96-bit IVs) still opens.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import type { StateKind } from '../tpm/state-store.js';
import { createDurableSync } from '../util/durable.js';
import { KIND_CODES, bytesToUuid, uuidToBytes } from './wire.js';
import { ChainError, splitChain } from './chain.js';

export const KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const MAGIC = Buffer.from('VTPMSEAL', 'ascii');
/** 1: instance key, random IV. 2: per-blob key from a random salt, IV from the generation. */
const FORMAT_RANDOM_IV = 1;
const FORMAT_BLOB_KEY = 2;
const SALT_BYTES = 16;
/** magic 8 | format u8 | kind u8 | instance u32 | uuid 16 | generation u64 — also the AAD. */
const HEADER_BYTES = 8 + 1 + 1 + 4 + 16 + 8;
const HKDF_SALT = Buffer.from('vtpm-split manager v1', 'ascii');
const PIECE_MAGIC = Buffer.from('VTPMPIEC', 'ascii');
const PIECE_FORMAT = 1;
/** magic 8 | format u8 | instance u32 | uuid 16 | base gen u64 | previous gen u64 | offset u64 | generation u64 — also the AAD. */
const PIECE_HEADER_BYTES = 8 + 1 + 4 + 16 + 8 + 8 + 8 + 8;

export const MASTER_KEY_FILE = 'master.key';
export const SEALED_PUB = 'master.tpm.pub';
export const SEALED_PRIV = 'master.tpm.priv';
export const SEALED_INFO = 'master.tpm.json';

export type SealErrorCode = 'TAMPERED' | 'WRONG_OWNER' | 'ROLLBACK' | 'BAD_FORMAT' | 'KEY_FILE' | 'TPM';

export class SealError extends Error {
  constructor(
    readonly code: SealErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'SealError';
  }
}

export interface BlobContext {
  instance: number;
  vmUuid: string;
  kind: StateKind;
  /** Monotonic per (instance, kind); the manager's metadata holds the one expected on load. */
  generation: number;
}

/** Bytes appended to a held volatile blob, sealed on their own (docs/manager-storage.md, "Appended pieces"). */
export interface PieceContext {
  instance: number;
  vmUuid: string;
  /** The generation of the whole blob the pieces follow. */
  base: number;
  /** The generation of what this piece follows: the base, or the piece before. */
  previous: number;
  /** Where the piece's bytes start in the blob's plaintext. */
  offset: number;
  /** The piece's own generation: the blob's generation once it is appended. */
  generation: number;
}

function pieceHeader(p: PieceContext): Buffer {
  const h = Buffer.alloc(PIECE_HEADER_BYTES);
  PIECE_MAGIC.copy(h, 0);
  h.writeUInt8(PIECE_FORMAT, 8);
  h.writeUInt32BE(p.instance >>> 0, 9);
  uuidToBytes(p.vmUuid).copy(h, 13);
  h.writeBigUInt64BE(BigInt(p.base), 29);
  h.writeBigUInt64BE(BigInt(p.previous), 37);
  h.writeBigUInt64BE(BigInt(p.offset), 45);
  h.writeBigUInt64BE(BigInt(p.generation), 53);
  return h;
}

function header(ctx: BlobContext, format: number): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(h, 0);
  h.writeUInt8(format, 8);
  h.writeUInt8(KIND_CODES[ctx.kind], 9);
  h.writeUInt32BE(ctx.instance >>> 0, 10);
  uuidToBytes(ctx.vmUuid).copy(h, 14);
  h.writeBigUInt64BE(BigInt(ctx.generation), 30);
  return h;
}

export class Sealer {
  readonly #master: Buffer;
  readonly #keys = new Map<string, Buffer>();

  constructor(master: Uint8Array) {
    if (master.length !== KEY_BYTES) throw new SealError('KEY_FILE', `master key must be ${KEY_BYTES} bytes, got ${master.length}`);
    this.#master = Buffer.from(master);
  }

  /** HKDF-SHA256(master, info = "instance" | instance u32 | uuid): one key per vTPM. */
  instanceKey(instance: number, vmUuid: string): Buffer {
    const id = `${instance}/${vmUuid}`;
    let k = this.#keys.get(id);
    if (!k) {
      const info = Buffer.alloc(8 + 4 + 16);
      info.write('instance', 0, 'ascii');
      info.writeUInt32BE(instance >>> 0, 8);
      uuidToBytes(vmUuid).copy(info, 12);
      k = Buffer.from(crypto.hkdfSync('sha256', this.#master, HKDF_SALT, info, KEY_BYTES));
      this.#keys.set(id, k);
    }
    return k;
  }

  /** Key that authenticates the manager's own metadata (VM table and expected generations). */
  metaKey(): Buffer {
    return Buffer.from(crypto.hkdfSync('sha256', this.#master, HKDF_SALT, Buffer.from('metadata', 'ascii'), KEY_BYTES));
  }

  /** Key that encrypts the host CA's private keys when the master key is sealed to a TPM (ca.ts). */
  caKeyWrap(): Buffer {
    return Buffer.from(crypto.hkdfSync('sha256', this.#master, HKDF_SALT, Buffer.from('ek-ca-key', 'ascii'), KEY_BYTES));
  }

  /** Key that encrypts the manager's private migration key where it is stored (migration.ts). */
  migrationKeyWrap(): Buffer {
    return Buffer.from(crypto.hkdfSync('sha256', this.#master, HKDF_SALT, Buffer.from('migration-key', 'ascii'), KEY_BYTES));
  }

  /** Format 2: header | salt 16 | tag 16 | ciphertext. */
  seal(ctx: BlobContext, data: Uint8Array): Buffer {
    const h = header(ctx, FORMAT_BLOB_KEY);
    const salt = crypto.randomBytes(SALT_BYTES);
    const c = crypto.createCipheriv('aes-256-gcm', this.blobKey(ctx, h, salt), generationIv(ctx.generation));
    c.setAAD(h);
    const body = Buffer.concat([c.update(data), c.final()]);
    return Buffer.concat([h, salt, c.getAuthTag(), body]);
  }

  /** HKDF-SHA256(instance key, salt, "blob" | header): the key of one blob. */
  blobKey(ctx: BlobContext, h: Buffer, salt: Uint8Array): Buffer {
    const info = Buffer.concat([Buffer.from('blob', 'ascii'), h]);
    return Buffer.from(crypto.hkdfSync('sha256', this.instanceKey(ctx.instance, ctx.vmUuid), salt, info, KEY_BYTES));
  }

  /** Piece header | salt 16 | tag 16 | ciphertext, under a key of its own (HKDF of the instance key, salt, header). */
  sealPiece(p: PieceContext, data: Uint8Array): Buffer {
    const h = pieceHeader(p);
    const salt = crypto.randomBytes(SALT_BYTES);
    const c = crypto.createCipheriv('aes-256-gcm', this.#pieceKey(p, h, salt), generationIv(p.generation));
    c.setAAD(h);
    const body = Buffer.concat([c.update(data), c.final()]);
    return Buffer.concat([h, salt, c.getAuthTag(), body]);
  }

  #pieceKey(p: PieceContext, h: Buffer, salt: Uint8Array): Buffer {
    const info = Buffer.concat([Buffer.from('piece', 'ascii'), h]);
    return Buffer.from(crypto.hkdfSync('sha256', this.instanceKey(p.instance, p.vmUuid), salt, info, KEY_BYTES));
  }

  /**
   * A stored blob: a bare envelope, or a volatile chain (chain.ts) whose base and pieces are opened in
   * order, each piece bound to this instance, the chain's base, the piece before it and the offset it
   * continues at, and the last one to the generation the metadata expects.
   */
  open(expected: BlobContext, stored: Uint8Array): Buffer {
    let chain: ReturnType<typeof splitChain>;
    try {
      chain = splitChain(stored);
    } catch (err) {
      if (err instanceof ChainError) throw new SealError('BAD_FORMAT', err.message);
      throw err;
    }
    if (chain.pieces.length === 0) return this.openEnvelope(expected, chain.base);
    if (expected.kind !== 'volatile') throw new SealError('BAD_FORMAT', `a ${expected.kind} blob with appended pieces`);
    const b = chain.base;
    if (b.length < HEADER_BYTES) throw new SealError('BAD_FORMAT', `chain base of ${b.length} bytes`);
    const base = Number(b.readBigUInt64BE(30));
    const parts = [this.openEnvelope({ ...expected, generation: base }, b)];
    let offset = parts[0]!.length;
    let previous = base;
    for (const [i, piece] of chain.pieces.entries()) {
      if (piece.length < PIECE_HEADER_BYTES + SALT_BYTES + TAG_BYTES || !piece.subarray(0, 8).equals(PIECE_MAGIC) || piece[8] !== PIECE_FORMAT)
        throw new SealError('BAD_FORMAT', `piece ${i} of instance ${expected.instance}'s volatile chain is not a sealed piece (${piece.length} bytes)`);
      const instance = piece.readUInt32BE(9);
      const uuid = bytesToUuid(piece.subarray(13, 29));
      if (instance !== expected.instance || uuid !== expected.vmUuid)
        throw new SealError('WRONG_OWNER', `piece ${i} belongs to instance ${instance} (vm ${uuid}), not instance ${expected.instance} (vm ${expected.vmUuid})`);
      const got = { base: Number(piece.readBigUInt64BE(29)), previous: Number(piece.readBigUInt64BE(37)), offset: Number(piece.readBigUInt64BE(45)) };
      if (got.base !== base || got.previous !== previous || got.offset !== offset)
        throw new SealError(
          'ROLLBACK',
          `piece ${i} follows base ${got.base}, generation ${got.previous} at offset ${got.offset}; the chain has base ${base}, generation ${previous}, offset ${offset}`,
        );
      const p: PieceContext = { instance: expected.instance, vmUuid: expected.vmUuid, base, previous, offset, generation: Number(piece.readBigUInt64BE(53)) };
      const h = pieceHeader(p);
      const salt = piece.subarray(PIECE_HEADER_BYTES, PIECE_HEADER_BYTES + SALT_BYTES);
      const d = crypto.createDecipheriv('aes-256-gcm', this.#pieceKey(p, h, salt), generationIv(p.generation));
      d.setAAD(h);
      d.setAuthTag(piece.subarray(PIECE_HEADER_BYTES + SALT_BYTES, PIECE_HEADER_BYTES + SALT_BYTES + TAG_BYTES));
      try {
        parts.push(Buffer.concat([d.update(piece.subarray(PIECE_HEADER_BYTES + SALT_BYTES + TAG_BYTES)), d.final()]));
      } catch {
        throw new SealError('TAMPERED', `authentication failed for piece ${i} (generation ${p.generation}) of instance ${expected.instance}'s volatile chain`);
      }
      offset += parts[parts.length - 1]!.length;
      previous = p.generation;
    }
    // The metadata names the last piece: a chain cut short ends at an older generation.
    if (previous !== expected.generation)
      throw new SealError('ROLLBACK', `volatile chain ends at generation ${previous} but the manager expects ${expected.generation}`);
    return Buffer.concat(parts);
  }

  /** Decrypts one envelope that must belong to `expected`; the reason of a refusal names what did not match. */
  openEnvelope(expected: BlobContext, envelope: Uint8Array): Buffer {
    const e = Buffer.from(envelope.buffer, envelope.byteOffset, envelope.length);
    const format = e[8];
    const nonceBytes = format === FORMAT_BLOB_KEY ? SALT_BYTES : IV_BYTES;
    if (e.length < HEADER_BYTES + nonceBytes + TAG_BYTES || !e.subarray(0, 8).equals(MAGIC) || (format !== FORMAT_RANDOM_IV && format !== FORMAT_BLOB_KEY))
      throw new SealError('BAD_FORMAT', `not a sealed vTPM blob (${e.length} bytes)`);
    const instance = e.readUInt32BE(10);
    const uuid = bytesToUuid(e.subarray(14, 30));
    const kindCode = e[9]!;
    const generation = Number(e.readBigUInt64BE(30));
    if (instance !== expected.instance || uuid !== expected.vmUuid || kindCode !== KIND_CODES[expected.kind])
      throw new SealError(
        'WRONG_OWNER',
        `blob belongs to instance ${instance} (vm ${uuid}, kind code ${kindCode}), not instance ${expected.instance} (vm ${expected.vmUuid}, ${expected.kind})`,
      );
    if (generation !== expected.generation)
      throw new SealError('ROLLBACK', `blob generation ${generation} but the manager expects ${expected.generation}`);
    // The AAD is rebuilt from what we expect, not taken from the file: an edited header fails the tag.
    const h = header(expected, format);
    const nonce = e.subarray(HEADER_BYTES, HEADER_BYTES + nonceBytes);
    const d =
      format === FORMAT_BLOB_KEY
        ? crypto.createDecipheriv('aes-256-gcm', this.blobKey(expected, h, nonce), generationIv(expected.generation))
        : crypto.createDecipheriv('aes-256-gcm', this.instanceKey(expected.instance, expected.vmUuid), nonce);
    d.setAAD(h);
    d.setAuthTag(e.subarray(HEADER_BYTES + nonceBytes, HEADER_BYTES + nonceBytes + TAG_BYTES));
    try {
      return Buffer.concat([d.update(e.subarray(HEADER_BYTES + nonceBytes + TAG_BYTES)), d.final()]);
    } catch {
      throw new SealError('TAMPERED', `authentication failed for instance ${expected.instance} ${expected.kind} generation ${expected.generation}`);
    }
  }
}

/** The IV of a format-2 blob: its generation, zero-padded (the key is the blob's own, so any fixed IV would do). */
function generationIv(generation: number): Buffer {
  const iv = Buffer.alloc(IV_BYTES);
  iv.writeBigUInt64BE(BigInt(generation), IV_BYTES - 8);
  return iv;
}

// ---- master key ------------------------------------------------------------------------------

/** The 0600 key file, created at first start. A file readable by others is refused, as ssh does. */
export function loadKeyFile(stateDir: string): { key: Buffer; created: boolean } {
  const file = path.join(stateDir, MASTER_KEY_FILE);
  if (!fs.existsSync(file)) {
    const key = crypto.randomBytes(KEY_BYTES);
    createDurableSync(file, key);
    return { key, created: true };
  }
  const st = fs.statSync(file);
  if ((st.mode & 0o077) !== 0) throw new SealError('KEY_FILE', `${file} has mode ${(st.mode & 0o777).toString(8)}; it must be 0600`);
  const key = fs.readFileSync(file);
  if (key.length !== KEY_BYTES) throw new SealError('KEY_FILE', `${file} holds ${key.length} bytes, expected ${KEY_BYTES}`);
  return { key, created: false };
}

/**
 * A cluster's shared key file (`--master-key`): every host of one etcd store holds the same 32 bytes.
 * Never created here (a host making its own would seal what no other host can open); same mode check.
 */
export function readMasterKeyFile(file: string): Buffer {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch {
    throw new SealError('KEY_FILE', `${file}: no such master key file (make one with: head -c 32 /dev/urandom > ${file}; chmod 600 ${file})`);
  }
  if ((st.mode & 0o077) !== 0) throw new SealError('KEY_FILE', `${file} has mode ${(st.mode & 0o777).toString(8)}; it must be 0600`);
  const key = fs.readFileSync(file);
  if (key.length !== KEY_BYTES) throw new SealError('KEY_FILE', `${file} holds ${key.length} bytes, expected ${KEY_BYTES}`);
  return key;
}

export interface TpmSealOptions {
  /** A tpm2-tools TCTI string, e.g. "swtpm:host=127.0.0.1,port=2321" or "device:/dev/tpmrm0". */
  tcti: string;
  /** PCR selection the key is sealed to, tpm2-tools syntax. */
  pcrs: string;
}

export const DEFAULT_SEAL_PCRS = 'sha256:0,1,2,3,4,5,6,7';

function tpm2(tool: string, args: string[], tcti: string, cwd: string, input?: Uint8Array): Buffer {
  try {
    const out = execFileSync(tool, args, {
      cwd,
      input,
      env: { ...process.env, TPM2TOOLS_TCTI: tcti },
      stdio: ['pipe', 'pipe', 'pipe'],
      timeout: 60_000,
    });
    // Without a resource manager (a bare TPM, swtpm socket) every object a tool loads stays loaded
    // after it exits, and the TPM holds only a few: flush transients after each step (the tools keep
    // what later steps need in saved-context files).
    if (tool !== 'tpm2_flushcontext') execFileSync('tpm2_flushcontext', ['-t'], { cwd, env: { ...process.env, TPM2TOOLS_TCTI: tcti }, stdio: 'pipe', timeout: 60_000 });
    return out;
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    const why = e.stderr?.toString().trim().split('\n').slice(-2).join(' / ') || e.message;
    throw new SealError('TPM', `${tool} failed: ${why}`);
  }
}

/** The storage primary under the owner hierarchy: same template, same seed, same key, every time. */
function createPrimary(tcti: string, dir: string): void {
  tpm2('tpm2_createprimary', ['-C', 'o', '-g', 'sha256', '-G', 'ecc', '-c', 'primary.ctx'], tcti, dir);
}

/**
 * The master key sealed to PCRs of a host TPM. First start: a fresh random key becomes a sealed-data
 * object under the owner storage primary whose policy is PolicyPCR over the current PCR values (no
 * userWithAuth, so only that policy unseals it); later starts load and unseal it, which fails once
 * those PCRs have changed.
 */
export function loadTpmSealedKey(stateDir: string, opts: TpmSealOptions): { key: Buffer; created: boolean } {
  const pub = path.join(stateDir, SEALED_PUB);
  const priv = path.join(stateDir, SEALED_PRIV);
  const info = path.join(stateDir, SEALED_INFO);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-seal-'));
  const flush = (): void => void tpm2('tpm2_flushcontext', ['-t'], opts.tcti, work);
  try {
    flush();
    createPrimary(opts.tcti, work);
    if (!fs.existsSync(pub) || !fs.existsSync(priv)) {
      const key = crypto.randomBytes(KEY_BYTES);
      tpm2('tpm2_createpolicy', ['--policy-pcr', '-l', opts.pcrs, '-L', 'policy.dgst'], opts.tcti, work);
      tpm2(
        'tpm2_create',
        ['-C', 'primary.ctx', '-g', 'sha256', '-L', 'policy.dgst', '-a', 'fixedtpm|fixedparent|noda', '-i', '-', '-u', 'seal.pub', '-r', 'seal.priv'],
        opts.tcti,
        work,
        key,
      );
      createDurableSync(info, Buffer.from(JSON.stringify({ pcrs: opts.pcrs }) + '\n'));
      createDurableSync(priv, fs.readFileSync(path.join(work, 'seal.priv')));
      createDurableSync(pub, fs.readFileSync(path.join(work, 'seal.pub')));
      return { key, created: true };
    }
    const pcrs = fs.existsSync(info) ? (JSON.parse(fs.readFileSync(info, 'utf8')) as { pcrs: string }).pcrs : opts.pcrs;
    tpm2('tpm2_load', ['-C', 'primary.ctx', '-u', pub, '-r', priv, '-c', 'seal.ctx'], opts.tcti, work);
    tpm2('tpm2_unseal', ['-c', 'seal.ctx', '-p', `pcr:${pcrs}`, '-o', 'key.bin'], opts.tcti, work);
    const key = fs.readFileSync(path.join(work, 'key.bin'));
    if (key.length !== KEY_BYTES) throw new SealError('TPM', `unsealed ${key.length} bytes, expected ${KEY_BYTES}`);
    return { key, created: false };
  } finally {
    try {
      flush();
    } catch {
      // the result (or the first error) matters more than a failed clean-up
    }
    fs.rmSync(work, { recursive: true, force: true });
  }
}
