// A record as the etcd store keeps it (docs/cluster.md, "Keys in etcd"): "VTPMETCD" | salt 16 | GCM tag 16
// | AES-256-GCM ciphertext of the JSON, under a key of its own derived from the metadata key and the salt,
// with the etcd key name as AAD so a record moved to another key does not open.
import crypto from 'node:crypto';
import { EtcdStoreError } from './etcd-claims.js';

const MAGIC = Buffer.from('VTPMETCD', 'ascii');
const SALT = 16;
const TAG = 16;

/** AES-256-GCM under a key of its own (HKDF of the metadata key and a random salt), the etcd key name as AAD. */
export function sealRecord(metaKey: Buffer, name: string, value: unknown): Buffer {
  const salt = crypto.randomBytes(SALT);
  const key = Buffer.from(crypto.hkdfSync('sha256', metaKey, salt, Buffer.from('etcd record', 'ascii'), 32));
  const c = crypto.createCipheriv('aes-256-gcm', key, Buffer.alloc(12));
  c.setAAD(Buffer.concat([MAGIC, Buffer.from(name)]));
  const ct = Buffer.concat([c.update(JSON.stringify(value)), c.final()]);
  return Buffer.concat([MAGIC, salt, c.getAuthTag(), ct]);
}

export function openRecord(metaKey: Buffer, name: string, b: Buffer): unknown {
  if (b.length < MAGIC.length + SALT + TAG || !b.subarray(0, MAGIC.length).equals(MAGIC)) throw new EtcdStoreError('FORMAT', `etcd key ${name} holds no sealed record`);
  const salt = b.subarray(MAGIC.length, MAGIC.length + SALT);
  const key = Buffer.from(crypto.hkdfSync('sha256', metaKey, salt, Buffer.from('etcd record', 'ascii'), 32));
  const d = crypto.createDecipheriv('aes-256-gcm', key, Buffer.alloc(12));
  d.setAAD(Buffer.concat([MAGIC, Buffer.from(name)]));
  d.setAuthTag(b.subarray(MAGIC.length + SALT, MAGIC.length + SALT + TAG));
  try {
    return JSON.parse(Buffer.concat([d.update(b.subarray(MAGIC.length + SALT + TAG)), d.final()]).toString('utf8'));
  } catch {
    throw new EtcdStoreError('FORMAT', `etcd key ${name} fails authentication (edited, moved from another key, or sealed under another master key)`);
  }
}

