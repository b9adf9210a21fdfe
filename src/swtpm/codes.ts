// swtpm's control-channel vocabulary (docs/protocols/swtpm-ctrl.md): command codes (tpm_ioctl.h CMD_*),
// capability bits (PTM_CAP_*), result codes (ptm_res), flags and limits, and the fixed-field encoders of
// requests and replies. Both servers of the protocol use these: the QEMU endpoint and the TCTI bridge.

/** CMD_* command codes. */
export const Cmd = {
  GET_CAPABILITY: 0x01,
  INIT: 0x02,
  SHUTDOWN: 0x03,
  GET_TPMESTABLISHED: 0x04,
  SET_LOCALITY: 0x05,
  HASH_START: 0x06,
  HASH_DATA: 0x07,
  HASH_END: 0x08,
  CANCEL_TPM_CMD: 0x09,
  STORE_VOLATILE: 0x0a,
  RESET_TPMESTABLISHED: 0x0b,
  GET_STATEBLOB: 0x0c,
  SET_STATEBLOB: 0x0d,
  STOP: 0x0e,
  GET_CONFIG: 0x0f,
  SET_DATAFD: 0x10,
  SET_BUFFERSIZE: 0x11,
  GET_INFO: 0x12,
  LOCK_STORAGE: 0x13,
} as const;

/** PTM_CAP_* bits of CMD_GET_CAPABILITY. */
export const Cap = {
  INIT: 0x1,
  SHUTDOWN: 0x2,
  GET_TPMESTABLISHED: 0x4,
  SET_LOCALITY: 0x8,
  HASHING: 0x10,
  CANCEL_TPM_CMD: 0x20,
  STORE_VOLATILE: 0x40,
  RESET_TPMESTABLISHED: 0x80,
  GET_STATEBLOB: 0x100,
  SET_STATEBLOB: 0x200,
  STOP: 0x400,
  GET_CONFIG: 0x800,
  SET_DATAFD: 0x1000,
  SET_BUFFERSIZE: 0x2000,
  GET_INFO: 0x4000,
  SEND_COMMAND_HEADER: 0x8000,
  LOCK_STORAGE: 0x10000,
} as const;

/** ptm_res values (libtpms' TPM 1.2 result codes, used for TPM 2 too). */
export const Res = {
  SUCCESS: 0x00,
  BAD_PARAMETER: 0x03,
  FAIL: 0x09,
  BAD_ORDINAL: 0x0a,
  KEYNOTFOUND: 0x0d,
  SIZE: 0x17,
  IOERROR: 0x1f,
  BAD_DATASIZE: 0x2b,
  BAD_VERSION: 0x2e,
  BAD_LOCALITY: 0x3d,
  RETRY: 0x800,
} as const;

export const INIT_FLAG_DELETE_VOLATILE = 0x1;
export const STATE_FLAG_DECRYPTED = 0x1;
export const STATE_FLAG_ENCRYPTED = 0x2;
export const BLOB_TYPE_PERMANENT = 1;
export const BLOB_TYPE_VOLATILE = 2;
export const BLOB_TYPE_SAVESTATE = 3;
/** PTM_GETINFO_SIZE: the most GET_INFO returns per request. */
export const GETINFO_SIZE = 3072;
/** swtpm's deadline for the rest of a started control message. */
export const CTRL_DEADLINE_MS = 500;
/** Largest state blob we accept (swtpm HEAD's limit; libtpms 0.9 blobs are ~10 KiB). Checked before allocating. */
export const MAX_STATE_BLOB = 512 * 1024;

/** A 4-byte response carrying only the result (every error, and most successes). */
export function resultOnly(res: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(res >>> 0, 0);
  return b;
}

/** Big-endian u32 fields, the shape of every fixed control response. */
export function u32s(...values: number[]): Buffer {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => b.writeUInt32BE(v >>> 0, 4 * i));
  return b;
}

/** A request as a client sends it: code + payload (for tests and our own client). */
export function encodeRequest(cmd: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(4 + payload.length);
  b.writeUInt32BE(cmd, 0);
  b.set(payload, 4);
  return b;
}
