// The one builder of the header-only error responses we make up ourselves (a command too large for the
// buffer, a TPM that is off or failed, a cancelled or lost command): 10 bytes, the way libtpms and swtpm
// frame their own (docs/protocols/swtpm-ctrl.md, "Data channel"). TPM 2.0 answers with tag 0x8001
// whatever the request's tag; TPM 1.2 with TPM_TAG_RSP_COMMAND (0xC4) whatever the request's tag, as
// libtpms does for a size error and swtpm for a TPM that is not initialised (an error carries no auth).
import {
  TPM2_ST_NO_SESSIONS,
  TPM2_ST_SESSIONS,
  TPM_BAD_PARAM_SIZE,
  TPM_FAIL,
  TPM_HEADER_SIZE,
  TPM_RC_CANCELED,
  TPM_RC_COMMAND_SIZE,
  TPM_RC_FAILURE,
  TPM_TAG_RSP_COMMAND,
  type TpmVersion,
} from './wire.js';

export type TpmFamily = TpmVersion;

/** The family a command belongs to, from its tag (TPM 2.0 tags are 0x8001/0x8002; anything else is 1.2). */
export function familyOf(command: Uint8Array): TpmFamily {
  return command.length < 2 ? '2.0' : familyOfTag((command[0]! << 8) | command[1]!);
}

export function familyOfTag(tag: number): TpmFamily {
  return tag === TPM2_ST_NO_SESSIONS || tag === TPM2_ST_SESSIONS ? '2.0' : '1.2';
}

/** A 10-byte response: the family's error tag, size 10, the response code (big-endian). */
export function errorResponse(family: TpmFamily, rc: number): Uint8Array {
  const out = new Uint8Array(TPM_HEADER_SIZE);
  const v = new DataView(out.buffer);
  v.setUint16(0, family === '2.0' ? TPM2_ST_NO_SESSIONS : TPM_TAG_RSP_COMMAND);
  v.setUint32(2, TPM_HEADER_SIZE);
  v.setUint32(6, rc >>> 0);
  return out;
}

/** The response code a TPM gives a command whose size is wrong for its buffer. */
export function sizeErrorCode(family: TpmFamily): number {
  return family === '2.0' ? TPM_RC_COMMAND_SIZE : TPM_BAD_PARAM_SIZE;
}

/** The response code of a TPM that cannot work at all (not initialised, failure mode). */
export function fatalErrorCode(family: TpmFamily): number {
  return family === '2.0' ? TPM_RC_FAILURE : TPM_FAIL;
}

/** What a command too large (or too small) for the buffer gets, in its own family. */
export function sizeErrorResponse(command: Uint8Array): Uint8Array {
  const fam = familyOf(command);
  return errorResponse(fam, sizeErrorCode(fam));
}

/** The response code of a cancelled command: TPM_RC_CANCELED for 2.0, TPM_FAIL for 1.2 (it has no cancel code). */
export function canceledCode(command: Uint8Array): number {
  return familyOf(command) === '2.0' ? TPM_RC_CANCELED : TPM_FAIL;
}

/** What a cancelled command returns. */
export function canceledResponse(command: Uint8Array): Uint8Array {
  return errorResponse(familyOf(command), canceledCode(command));
}

/** What a command gets when its vTPM failed or vanished under it. */
export function failureResponse(command: Uint8Array): Uint8Array {
  const fam = familyOf(command);
  return errorResponse(fam, fatalErrorCode(fam));
}
