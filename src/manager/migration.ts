// The manager's migration role (Xen 3.x vtpm_manager: GET_MIG_KEY, LOAD_MIG_KEY, MIGRATE_OUT,
// MIGRATE_IN; docs/migration.md). Parameter layouts are Xen's; what Xen delegated to the hardware
// TPM is ours:
//   - Xen's migration key was the manager's TPM storage key (an RSA key wrapped under the SRK) and the
//     state was envelope-encrypted to it (RSAES-OAEP-SHA1 bind of an AES-128-CBC key, zero IV, no MAC).
//     Here each manager holds an RSA-3072 key pair in its store (the private half AES-256-GCM encrypted
//     under a key derived from the master key); the blob's fresh AES-256-GCM key is wrapped with
//     RSAES-OAEP-SHA256 to the destination's key, and the whole header is authenticated.
//   - Xen's clear blob was DMI measurement (20 bytes) ‖ u32 size ‖ NVM data; ours carries every stored
//     libtpms blob (permanent, volatile, savestate), bound in the authenticated header to the VM uuid,
//     source instance, TPM version, both keys' fingerprints and a migration counter, so that a blob
//     opens only at the destination it was made for, and only once (the destination remembers the
//     highest counter per VM, durably, even after DELETE).
//   - Xen kept loaded destination keys in a list in memory (its TODO: "persistent list"); ours are in
//     the store's table, named as Xen named them (the destination's address).
import crypto from 'node:crypto';
import { STATE_KINDS, type StateKind } from '../tpm/state-store.js';
import { MAX_PARAMS, TPM_VERSIONS, WireError, bytesToUuid, isUuid, uuidToBytes, type TpmVersion } from './wire.js';

export const MIG_KEY_BITS = 3072;
const MIN_MODULUS_BITS = 2048;
const MAX_MODULUS_BYTES = 2048; // 16384 bits
const MAX_EXPONENT_BYTES = 8;
/** 65537, what an exponent of size 0 stands for (TPM 1.2 TPM_RSA_KEY_PARMS). */
const DEFAULT_EXPONENT = Buffer.from([0x01, 0x00, 0x01]);
const MAX_NAME = 255;
const AES_KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;

export class MigrationError extends Error {
  constructor(
    readonly code: 'BAD_FORMAT' | 'WRONG_KEY' | 'TAMPERED' | 'BAD_KEY' | 'KEY_STORE',
    message: string,
  ) {
    super(message);
    this.name = 'MigrationError';
  }
}

// ---- parameter blocks (Xen's layouts, all big-endian) ---------------------------------------------

/** Reads length-prefixed fields, checking every length against what is left before copying. */
class ParamReader {
  #off = 0;
  constructor(
    private readonly b: Buffer,
    private readonly what: string,
  ) {}

  u32(field: string): number {
    if (this.b.length - this.#off < 4) throw this.#short(field, 4);
    const v = this.b.readUInt32BE(this.#off);
    this.#off += 4;
    return v;
  }

  /** Xen's BSG_TPM_SIZE32_DATA: u32 size ‖ size bytes. */
  sized(field: string, max: number): Buffer {
    const n = this.u32(`${field} size`);
    if (n > max) throw new WireError('BAD_PARAMS', `${this.what}: ${field} of ${n} bytes exceeds the limit of ${max}`);
    if (this.b.length - this.#off < n) throw this.#short(field, n);
    const v = this.b.subarray(this.#off, this.#off + n);
    this.#off += n;
    return v;
  }

  fixed(field: string, n: number): Buffer {
    if (this.b.length - this.#off < n) throw this.#short(field, n);
    const v = this.b.subarray(this.#off, this.#off + n);
    this.#off += n;
    return v;
  }

  end(): void {
    if (this.#off !== this.b.length) throw new WireError('BAD_PARAMS', `${this.what}: ${this.b.length - this.#off} bytes after the last field`);
  }

  #short(field: string, n: number): WireError {
    return new WireError('BAD_PARAMS', `${this.what}: ${field} needs ${n} bytes at offset ${this.#off}, only ${this.b.length - this.#off} left`);
  }
}

const asBuffer = (p: Uint8Array): Buffer => Buffer.from(p.buffer, p.byteOffset, p.length);

function sized(data: Uint8Array): Buffer {
  const n = Buffer.alloc(4);
  n.writeUInt32BE(data.length);
  return Buffer.concat([n, data]);
}

/** An RSA public key as Xen sent it: exponent and modulus, big-endian, no leading zeros required; an empty exponent is 65537. */
export interface RsaPublic {
  exponent: Buffer;
  modulus: Buffer;
}

/** GET_MIG_KEY response (Xen): u32 exp_size ‖ exponent ‖ u32 mod_size ‖ modulus. */
export function encodeMigKey(k: RsaPublic): Buffer {
  return Buffer.concat([sized(k.exponent), sized(k.modulus)]);
}

function readKey(r: ParamReader): RsaPublic {
  const exponent = r.sized('exponent', MAX_EXPONENT_BYTES);
  const modulus = r.sized('modulus', MAX_MODULUS_BYTES);
  return { exponent: Buffer.from(exponent), modulus: Buffer.from(modulus) };
}

export function decodeMigKey(params: Uint8Array): RsaPublic {
  const r = new ParamReader(asBuffer(params), 'GET_MIG_KEY response');
  const k = readKey(r);
  r.end();
  return k;
}

const NAME_RE = /^[\x21-\x7e]{1,255}$/;

/** Xen's names are C strings sent with their NUL; we accept and send them that way, printable only. */
function readName(r: ParamReader, what: string): string {
  let raw = r.sized('name', MAX_NAME + 1);
  if (raw.length > 0 && raw[raw.length - 1] === 0) raw = raw.subarray(0, raw.length - 1);
  const name = raw.toString('latin1');
  if (!NAME_RE.test(name)) throw new WireError('BAD_PARAMS', `${what}: destination name ${JSON.stringify(name)} is not 1..${MAX_NAME} printable characters`);
  return name;
}

function nameBytes(name: string): Buffer {
  if (!NAME_RE.test(name)) throw new WireError('BAD_PARAMS', `destination name ${JSON.stringify(name)} is not 1..${MAX_NAME} printable characters`);
  return Buffer.concat([Buffer.from(name, 'latin1'), Buffer.of(0)]);
}

/** LOAD_MIG_KEY params (Xen): u32 name_size ‖ name (NUL-terminated) ‖ u32 exp_size ‖ exp ‖ u32 mod_size ‖ mod. */
export function encodeLoadMigKey(name: string, k: RsaPublic): Buffer {
  return Buffer.concat([sized(nameBytes(name)), encodeMigKey(k)]);
}

export function decodeLoadMigKey(params: Uint8Array): { name: string; key: RsaPublic } {
  const r = new ParamReader(asBuffer(params), 'LOAD_MIG_KEY');
  const name = readName(r, 'LOAD_MIG_KEY');
  const key = readKey(r);
  r.end();
  return { name, key };
}

/**
 * MIGRATE_OUT params (Xen): instance u32 ‖ u32 name_size ‖ name (the destination LOAD_MIG_KEY named).
 * Ours: instance 0 (dom0's in Xen, never a guest's vTPM) followed, after the name, by the VM's uuid (16
 * bytes) names the vTPM by its VM instead.
 */
export function encodeMigrateOut(instance: number, name: string, vmUuid?: string): Buffer {
  const i = Buffer.alloc(4);
  i.writeUInt32BE(instance >>> 0);
  return Buffer.concat([i, sized(nameBytes(name)), vmUuid === undefined ? Buffer.alloc(0) : uuidToBytes(vmUuid)]);
}

export function decodeMigrateOut(params: Uint8Array): { instance: number; name: string; vmUuid: string | null } {
  const b = asBuffer(params);
  const r = new ParamReader(b, 'MIGRATE_OUT');
  const instance = r.u32('instance');
  const name = readName(r, 'MIGRATE_OUT');
  let vmUuid: string | null = null;
  if (instance === 0) {
    vmUuid = bytesToUuid(r.fixed('vm uuid', 16));
    if (!isUuid(vmUuid)) throw new WireError('BAD_PARAMS', 'MIGRATE_OUT: bad vm uuid');
  }
  r.end();
  return { instance, name, vmUuid };
}

/** MIGRATE_IN params (Xen): instance u32 (ours: 0 = any free one) ‖ u32 blob_size ‖ blob. */
export function encodeMigrateIn(instance: number, blob: Uint8Array): Buffer {
  const i = Buffer.alloc(4);
  i.writeUInt32BE(instance >>> 0);
  return Buffer.concat([i, sized(blob)]);
}

export function decodeMigrateIn(params: Uint8Array): { instance: number; blob: Buffer } {
  const r = new ParamReader(asBuffer(params), 'MIGRATE_IN');
  const instance = r.u32('instance');
  const blob = r.sized('blob', MAX_PARAMS);
  r.end();
  return { instance, blob };
}

// ---- keys ------------------------------------------------------------------------------------------

const b64u = (b: Uint8Array): string => Buffer.from(b).toString('base64url');

/** A KeyObject from Xen's (exponent, modulus), refusing keys too small or malformed to encrypt to. */
export function publicKeyFrom(k: RsaPublic): crypto.KeyObject {
  const first = k.modulus.findIndex((x) => x !== 0);
  const mod = first < 0 ? Buffer.alloc(0) : k.modulus.subarray(first);
  const bits = mod.length === 0 ? 0 : (mod.length - 1) * 8 + (32 - Math.clz32(mod[0]!));
  if (bits < MIN_MODULUS_BITS) throw new MigrationError('BAD_KEY', `RSA modulus of ${bits} bits; at least ${MIN_MODULUS_BITS} required`);
  if ((mod[mod.length - 1]! & 1) === 0) throw new MigrationError('BAD_KEY', 'RSA modulus is even');
  // Xen's key was a TPM key: TPM_RSA_KEY_PARMS with exponentSize 0 means the default exponent 2^16+1.
  const given = k.exponent.length === 0 ? DEFAULT_EXPONENT : k.exponent;
  const lead = given.findIndex((x) => x !== 0);
  const exp = lead < 0 ? Buffer.alloc(0) : given.subarray(lead);
  if (exp.length === 0 || (exp[exp.length - 1]! & 1) === 0 || (exp.length === 1 && exp[0]! < 3))
    throw new MigrationError('BAD_KEY', `RSA exponent 0x${exp.toString('hex') || '0'} is not an odd number ≥ 3`);
  try {
    return crypto.createPublicKey({ key: { kty: 'RSA', n: b64u(mod), e: b64u(exp) }, format: 'jwk' });
  } catch (err) {
    throw new MigrationError('BAD_KEY', `not a usable RSA public key: ${(err as Error).message}`);
  }
}

export function rsaPublicOf(key: crypto.KeyObject): RsaPublic {
  const jwk = key.export({ format: 'jwk' });
  if (jwk.kty !== 'RSA' || !jwk.n || !jwk.e) throw new MigrationError('BAD_KEY', 'not an RSA key');
  return { exponent: Buffer.from(jwk.e, 'base64url'), modulus: Buffer.from(jwk.n, 'base64url') };
}

/** SHA-256 of the key's SubjectPublicKeyInfo DER: how blobs and logs name a manager's key. */
export function fingerprint(key: crypto.KeyObject): Buffer {
  return crypto.createHash('sha256').update(key.export({ format: 'der', type: 'spki' })).digest();
}

/** What the store keeps of this manager's own key pair (inside the authenticated table). */
export interface StoredIdentity {
  /** SPKI DER, base64. */
  spki: string;
  /** iv 12 ‖ tag 16 ‖ AES-256-GCM(PKCS#8 DER), base64; the AAD is the SPKI DER. */
  sealedPkcs8: string;
  created: string;
}

export interface Identity {
  publicKey: crypto.KeyObject;
  privateKey: crypto.KeyObject;
  fingerprint: Buffer;
}

export async function createIdentity(wrapKey: Buffer, now = new Date()): Promise<{ identity: Identity; stored: StoredIdentity }> {
  const { publicKey, privateKey } = await new Promise<crypto.KeyPairKeyObjectResult>((resolve, reject) =>
    crypto.generateKeyPair('rsa', { modulusLength: MIG_KEY_BITS, publicExponent: 65537 }, (err, pub, priv) => (err ? reject(err) : resolve({ publicKey: pub, privateKey: priv }))),
  );
  const spki = publicKey.export({ format: 'der', type: 'spki' });
  const iv = crypto.randomBytes(IV_BYTES);
  const c = crypto.createCipheriv('aes-256-gcm', wrapKey, iv);
  c.setAAD(spki);
  const body = Buffer.concat([c.update(privateKey.export({ format: 'der', type: 'pkcs8' })), c.final()]);
  return {
    identity: { publicKey, privateKey, fingerprint: fingerprint(publicKey) },
    stored: { spki: spki.toString('base64'), sealedPkcs8: Buffer.concat([iv, c.getAuthTag(), body]).toString('base64'), created: now.toISOString() },
  };
}

export function openIdentity(wrapKey: Buffer, s: StoredIdentity): Identity {
  const spki = Buffer.from(s.spki, 'base64');
  const sealed = Buffer.from(s.sealedPkcs8, 'base64');
  if (sealed.length < IV_BYTES + TAG_BYTES) throw new MigrationError('KEY_STORE', 'stored migration key is truncated');
  const d = crypto.createDecipheriv('aes-256-gcm', wrapKey, sealed.subarray(0, IV_BYTES));
  d.setAAD(spki);
  d.setAuthTag(sealed.subarray(IV_BYTES, IV_BYTES + TAG_BYTES));
  let der: Buffer;
  try {
    der = Buffer.concat([d.update(sealed.subarray(IV_BYTES + TAG_BYTES)), d.final()]);
  } catch {
    throw new MigrationError('KEY_STORE', 'stored migration private key does not decrypt under this master key');
  }
  const publicKey = crypto.createPublicKey({ key: spki, format: 'der', type: 'spki' });
  return { publicKey, privateKey: crypto.createPrivateKey({ key: der, format: 'der', type: 'pkcs8' }), fingerprint: fingerprint(publicKey) };
}

// ---- durable migration state -----------------------------------------------------------------------

export interface Destination {
  spki: string;
  fingerprint: string;
  loaded: string;
}

/** Stored in the store's table next to the VM table. */
export interface MigrationRecord {
  identity: StoredIdentity | null;
  /** LOAD_MIG_KEY name → destination public key. */
  destinations: Record<string, Destination>;
  /** VM uuid → the highest migration counter this manager sent out or took in for it (never forgotten). */
  counters: Record<string, number>;
}

export function emptyMigrationRecord(): MigrationRecord {
  return { identity: null, destinations: {}, counters: {} };
}

export function migrationRecordFrom(x: unknown): MigrationRecord {
  const r = x as Partial<MigrationRecord> | null | undefined;
  if (!r || typeof r !== 'object') return emptyMigrationRecord();
  if (typeof r.destinations !== 'object' || typeof r.counters !== 'object' || r.destinations === null || r.counters === null)
    throw new MigrationError('KEY_STORE', 'migration record in the table is malformed');
  return { identity: r.identity ?? null, destinations: { ...r.destinations }, counters: { ...r.counters } };
}

// ---- the blob --------------------------------------------------------------------------------------

const MAGIC = Buffer.from('VTPMMIGR', 'ascii');
const FORMAT = 1;
/**
 * magic 8 | format u8 | TPM version u8 | vm type u8 | reserved u8 | vm uuid 16 | source instance u32 |
 * counter u64 | migration id 16 | destination key fingerprint 32 | source key fingerprint 32 |
 * wrapped key size u16 — then the wrapped key; all of it is the AES-GCM AAD.
 */
const FIXED = 8 + 1 + 1 + 1 + 1 + 16 + 4 + 8 + 16 + 32 + 32 + 2;

export interface BlobHeader {
  version: TpmVersion;
  vmType: number;
  vmUuid: string;
  instance: number;
  counter: number;
  id: Buffer;
  destination: Buffer;
  source: Buffer;
}

export type StateBlobs = Partial<Record<StateKind, Buffer>>;

/** Plaintext: count u8 ‖ per blob { kind u8 (0 permanent, 1 volatile, 2 savestate) ‖ u32 size ‖ data }. */
function encodeStates(states: StateBlobs): Buffer {
  const parts: Buffer[] = [];
  let n = 0;
  STATE_KINDS.forEach((kind, code) => {
    const d = states[kind];
    if (!d) return;
    const h = Buffer.alloc(5);
    h.writeUInt8(code, 0);
    h.writeUInt32BE(d.length, 1);
    parts.push(h, d);
    n++;
  });
  return Buffer.concat([Buffer.of(n), ...parts]);
}

function decodeStates(b: Buffer): StateBlobs {
  const out: StateBlobs = {};
  if (b.length < 1) throw new MigrationError('BAD_FORMAT', 'empty state list');
  let off = 1;
  for (let i = 0; i < b[0]!; i++) {
    if (b.length - off < 5) throw new MigrationError('BAD_FORMAT', `state entry ${i} header truncated`);
    const kind = STATE_KINDS[b[off]!];
    const len = b.readUInt32BE(off + 1);
    off += 5;
    if (!kind) throw new MigrationError('BAD_FORMAT', `state entry ${i} has unknown kind ${b[off - 5]}`);
    if (out[kind]) throw new MigrationError('BAD_FORMAT', `state entry ${i} repeats ${kind}`);
    if (len === 0 || len > b.length - off) throw new MigrationError('BAD_FORMAT', `state entry ${i} (${kind}) claims ${len} bytes, ${b.length - off} left`);
    out[kind] = Buffer.from(b.subarray(off, off + len));
    off += len;
  }
  if (off !== b.length) throw new MigrationError('BAD_FORMAT', `${b.length - off} bytes after the last state entry`);
  return out;
}

function encodeHeader(h: BlobHeader, wrappedLen: number): Buffer {
  const b = Buffer.alloc(FIXED);
  MAGIC.copy(b, 0);
  b.writeUInt8(FORMAT, 8);
  b.writeUInt8(TPM_VERSIONS[h.version], 9);
  b.writeUInt8(h.vmType & 0xff, 10);
  uuidToBytes(h.vmUuid).copy(b, 12);
  b.writeUInt32BE(h.instance >>> 0, 28);
  b.writeBigUInt64BE(BigInt(h.counter), 32);
  h.id.copy(b, 40);
  h.destination.copy(b, 56);
  h.source.copy(b, 88);
  b.writeUInt16BE(wrappedLen, 120);
  return b;
}

/** MIGRATE_OUT: the VM's state, encrypted to `destination` and bound to everything in the header. */
export function sealForMigration(h: Omit<BlobHeader, 'destination' | 'id'>, destination: crypto.KeyObject, states: StateBlobs): Buffer {
  const aesKey = crypto.randomBytes(AES_KEY_BYTES);
  const wrapped = crypto.publicEncrypt({ key: destination, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, aesKey);
  const aad = Buffer.concat([encodeHeader({ ...h, id: crypto.randomBytes(16), destination: fingerprint(destination) }, wrapped.length), wrapped]);
  const iv = crypto.randomBytes(IV_BYTES);
  const c = crypto.createCipheriv('aes-256-gcm', aesKey, iv);
  c.setAAD(aad);
  const body = Buffer.concat([c.update(encodeStates(states)), c.final()]);
  return Buffer.concat([aad, iv, c.getAuthTag(), body]);
}

/** Reads the header without decrypting (for refusals that must name the blob, and for `vtpm migrate show`). */
export function readBlobHeader(blob: Uint8Array): BlobHeader & { wrappedLen: number } {
  const b = asBuffer(blob);
  if (b.length < FIXED || !b.subarray(0, 8).equals(MAGIC)) throw new MigrationError('BAD_FORMAT', `not a vTPM migration blob (${b.length} bytes, no VTPMMIGR header)`);
  if (b[8] !== FORMAT) throw new MigrationError('BAD_FORMAT', `migration blob format ${b[8]}, this manager reads ${FORMAT}`);
  const version = (Object.keys(TPM_VERSIONS) as TpmVersion[]).find((k) => TPM_VERSIONS[k] === b[9]);
  if (!version) throw new MigrationError('BAD_FORMAT', `unknown TPM version code ${b[9]}`);
  const vmUuid = bytesToUuid(b.subarray(12, 28));
  if (!isUuid(vmUuid)) throw new MigrationError('BAD_FORMAT', 'bad vm uuid');
  const counter = b.readBigUInt64BE(32);
  if (counter < 1n || counter > BigInt(Number.MAX_SAFE_INTEGER)) throw new MigrationError('BAD_FORMAT', `migration counter ${counter} out of range`);
  const wrappedLen = b.readUInt16BE(120);
  if (wrappedLen === 0 || wrappedLen > MAX_MODULUS_BYTES) throw new MigrationError('BAD_FORMAT', `wrapped key size ${wrappedLen} out of range`);
  if (b.length < FIXED + wrappedLen + IV_BYTES + TAG_BYTES + 1) throw new MigrationError('BAD_FORMAT', `migration blob of ${b.length} bytes is truncated`);
  return {
    version,
    vmType: b[10]!,
    vmUuid,
    instance: b.readUInt32BE(28),
    counter: Number(counter),
    id: Buffer.from(b.subarray(40, 56)),
    destination: Buffer.from(b.subarray(56, 88)),
    source: Buffer.from(b.subarray(88, 120)),
    wrappedLen,
  };
}

/** MIGRATE_IN: opens a blob made for `me`; every refusal says which check failed. */
export function openMigration(me: Identity, blob: Uint8Array): { header: BlobHeader; states: StateBlobs } {
  const b = asBuffer(blob);
  const h = readBlobHeader(b);
  if (!h.destination.equals(me.fingerprint))
    throw new MigrationError('WRONG_KEY', `blob was made for migration key ${h.destination.toString('hex').slice(0, 16)}…, this manager's key is ${me.fingerprint.toString('hex').slice(0, 16)}…`);
  const aadEnd = FIXED + h.wrappedLen;
  let aesKey: Buffer;
  try {
    aesKey = crypto.privateDecrypt({ key: me.privateKey, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, b.subarray(FIXED, aadEnd));
  } catch {
    throw new MigrationError('WRONG_KEY', 'the wrapped state key does not decrypt with this manager\'s migration key');
  }
  if (aesKey.length !== AES_KEY_BYTES) throw new MigrationError('WRONG_KEY', `unwrapped a ${aesKey.length}-byte key, expected ${AES_KEY_BYTES}`);
  const d = crypto.createDecipheriv('aes-256-gcm', aesKey, b.subarray(aadEnd, aadEnd + IV_BYTES));
  d.setAAD(b.subarray(0, aadEnd));
  d.setAuthTag(b.subarray(aadEnd + IV_BYTES, aadEnd + IV_BYTES + TAG_BYTES));
  let plain: Buffer;
  try {
    plain = Buffer.concat([d.update(b.subarray(aadEnd + IV_BYTES + TAG_BYTES)), d.final()]);
  } catch {
    throw new MigrationError('TAMPERED', `authentication of the migration blob for vm ${h.vmUuid} (counter ${h.counter}) failed: edited or truncated`);
  }
  const { wrappedLen: _w, ...header } = h;
  return { header, states: decodeStates(plain) };
}
