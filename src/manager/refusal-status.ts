// The tcg.h status a manager request is answered with when its handler refused or failed.
import { EtcdStoreError } from './etcd-claims.js';
import { MIGRATION_STATUS } from './migration-handlers.js';
import { MigrationError } from './migration.js';
import { Refusal } from './refusal.js';
import { StoreError } from './store-meta.js';
import { VmTableError } from './vm-table.js';
import { Status, WireError, type StatusCode } from './wire.js';

export function statusForError(err: unknown): StatusCode {
  if (err instanceof Refusal || err instanceof WireError) return err.status;
  if (err instanceof VmTableError) return err.code === 'FULL' ? Status.RESOURCES : Status.BAD_PARAMETER;
  if (err instanceof MigrationError) return MIGRATION_STATUS[err.code];
  // A missing blob file must not read as "never stored" (IOERROR): a fresh TPM would replace the lost one.
  if (err instanceof StoreError) return err.code === 'IO' || err.code === 'MISSING_BLOB' ? Status.FAIL : Status.DECRYPT_ERROR;
  // Held by another host: a policy refusal naming the holder. Fenced or etcd down: the request failed.
  if (err instanceof EtcdStoreError) return err.code === 'HELD' ? Status.AUTHFAIL : err.code === 'FORMAT' || err.code === 'KEY_MISMATCH' ? Status.DECRYPT_ERROR : Status.FAIL;
  return Status.FAIL;
}
