// Responses the backend makes up itself when a command cannot reach (or finish on) the vTPM: the
// 10-byte header-only answers a real TPM gives, in the family (1.2 or 2.0) of the command's tag.

export const TPM2_ST_NO_SESSIONS = 0x8001;
export const TPM2_ST_SESSIONS = 0x8002;
export const TPM_TAG_RQU_COMMAND = 0x00c1;

export const TPM_RC_COMMAND_SIZE = 0x142;
export const TPM_RC_CANCELED = 0x909;
export const TPM_RC_FAILURE = 0x101;
export const TPM_RC_RETRY = 0x922;

export const TPM_FAIL = 0x09;
export const TPM_BAD_PARAM_SIZE = 0x19;

export type TpmFamily = '2.0' | '1.2';

/** The family a command belongs to, from its tag (TPM 2.0 tags are 0x8001/0x8002). */
export function familyOf(command: Uint8Array): TpmFamily {
  if (command.length < 2) return '2.0';
  const tag = (command[0]! << 8) | command[1]!;
  return tag === TPM2_ST_NO_SESSIONS || tag === TPM2_ST_SESSIONS ? '2.0' : '1.2';
}

/** A 10-byte response: tag, size 10, return code (big-endian). 1.2 answers with the request tag + 3. */
export function errorResponse(family: TpmFamily, rc: number, requestTag = TPM_TAG_RQU_COMMAND): Uint8Array {
  const b = Buffer.alloc(10);
  b.writeUInt16BE(family === '2.0' ? TPM2_ST_NO_SESSIONS : (requestTag + 3) & 0xffff, 0);
  b.writeUInt32BE(10, 2);
  b.writeUInt32BE(rc >>> 0, 6);
  return new Uint8Array(b.buffer, b.byteOffset, 10);
}

/** What a cancelled command returns: TPM_RC_CANCELED for 2.0, TPM_FAIL for 1.2 (it has no cancel code). */
export function canceledResponse(command: Uint8Array): Uint8Array {
  const fam = familyOf(command);
  return errorResponse(fam, fam === '2.0' ? TPM_RC_CANCELED : TPM_FAIL, tagOf(command));
}

/** What a command gets when its vTPM failed or vanished under it. */
export function failureResponse(command: Uint8Array): Uint8Array {
  const fam = familyOf(command);
  return errorResponse(fam, fam === '2.0' ? TPM_RC_FAILURE : TPM_FAIL, tagOf(command));
}

function tagOf(command: Uint8Array): number {
  return command.length >= 2 ? (command[0]! << 8) | command[1]! : TPM_TAG_RQU_COMMAND;
}

/** The response code of a response (0 = success), or -1 when it is too short to have one. */
export function responseCode(response: Uint8Array): number {
  if (response.length < 10) return -1;
  return ((response[6]! << 24) | (response[7]! << 16) | (response[8]! << 8) | response[9]!) >>> 0;
}
