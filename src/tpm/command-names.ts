// TPM 2.0 command codes (TPM 2.0 Part 2, TPM_CC) by name, for metric labels and capture summaries. A
// guest chooses the command code: anything not in this table is `unknown`, so a label never takes a
// value a guest made up (bounded cardinality, docs/observability.md).
const CC: Record<number, string> = {
  0x11f: 'NV_UndefineSpaceSpecial', 0x120: 'EvictControl', 0x121: 'HierarchyControl', 0x122: 'NV_UndefineSpace',
  0x124: 'ChangeEPS', 0x125: 'ChangePPS', 0x126: 'Clear', 0x127: 'ClearControl', 0x128: 'ClockSet',
  0x129: 'HierarchyChangeAuth', 0x12a: 'NV_DefineSpace', 0x12b: 'PCR_Allocate', 0x12c: 'PCR_SetAuthPolicy',
  0x12d: 'PP_Commands', 0x12e: 'SetPrimaryPolicy', 0x12f: 'FieldUpgradeStart', 0x130: 'ClockRateAdjust',
  0x131: 'CreatePrimary', 0x132: 'NV_GlobalWriteLock', 0x133: 'GetCommandAuditDigest', 0x134: 'NV_Increment',
  0x135: 'NV_SetBits', 0x136: 'NV_Extend', 0x137: 'NV_Write', 0x138: 'NV_WriteLock',
  0x139: 'DictionaryAttackLockReset', 0x13a: 'DictionaryAttackParameters', 0x13b: 'NV_ChangeAuth',
  0x13c: 'PCR_Event', 0x13d: 'PCR_Reset', 0x13e: 'SequenceComplete', 0x13f: 'SetAlgorithmSet',
  0x140: 'SetCommandCodeAuditStatus', 0x141: 'FieldUpgradeData', 0x142: 'IncrementalSelfTest', 0x143: 'SelfTest',
  0x144: 'Startup', 0x145: 'Shutdown', 0x146: 'StirRandom', 0x147: 'ActivateCredential', 0x148: 'Certify',
  0x149: 'PolicyNV', 0x14a: 'CertifyCreation', 0x14b: 'Duplicate', 0x14c: 'GetTime', 0x14d: 'GetSessionAuditDigest',
  0x14e: 'NV_Read', 0x14f: 'NV_ReadLock', 0x150: 'ObjectChangeAuth', 0x151: 'PolicySecret', 0x152: 'Rewrap',
  0x153: 'Create', 0x154: 'ECDH_ZGen', 0x155: 'HMAC', 0x156: 'Import', 0x157: 'Load', 0x158: 'Quote',
  0x159: 'RSA_Decrypt', 0x15b: 'HMAC_Start', 0x15c: 'SequenceUpdate', 0x15d: 'Sign', 0x15e: 'Unseal',
  0x160: 'PolicySigned', 0x161: 'ContextLoad', 0x162: 'ContextSave', 0x163: 'ECDH_KeyGen', 0x164: 'EncryptDecrypt',
  0x165: 'FlushContext', 0x167: 'LoadExternal', 0x168: 'MakeCredential', 0x169: 'NV_ReadPublic',
  0x16a: 'PolicyAuthorize', 0x16b: 'PolicyAuthValue', 0x16c: 'PolicyCommandCode', 0x16d: 'PolicyCounterTimer',
  0x16e: 'PolicyCpHash', 0x16f: 'PolicyLocality', 0x170: 'PolicyNameHash', 0x171: 'PolicyOR', 0x172: 'PolicyTicket',
  0x173: 'ReadPublic', 0x174: 'RSA_Encrypt', 0x176: 'StartAuthSession', 0x177: 'VerifySignature',
  0x178: 'ECC_Parameters', 0x179: 'FirmwareRead', 0x17a: 'GetCapability', 0x17b: 'GetRandom', 0x17c: 'GetTestResult',
  0x17d: 'Hash', 0x17e: 'PCR_Read', 0x17f: 'PolicyPCR', 0x180: 'PolicyRestart', 0x181: 'ReadClock',
  0x182: 'PCR_Extend', 0x183: 'PCR_SetAuthValue', 0x184: 'NV_Certify', 0x185: 'EventSequenceComplete',
  0x186: 'HashSequenceStart', 0x187: 'PolicyPhysicalPresence', 0x188: 'PolicyDuplicationSelect',
  0x189: 'PolicyGetDigest', 0x18a: 'TestParms', 0x18b: 'Commit', 0x18c: 'PolicyPassword', 0x18d: 'ZGen_2Phase',
  0x18e: 'EC_Ephemeral', 0x18f: 'PolicyNvWritten', 0x190: 'PolicyTemplate', 0x191: 'CreateLoaded',
  0x192: 'PolicyAuthorizeNV', 0x193: 'EncryptDecrypt2', 0x194: 'AC_GetCapability', 0x195: 'AC_Send',
  0x196: 'Policy_AC_SendSelect', 0x197: 'CertifyX509', 0x198: 'ACT_SetTimeout', 0x199: 'ECC_Encrypt', 0x19a: 'ECC_Decrypt',
};

/** The command's name: a TPM 2.0 TPM_CC name, `tpm12` for any TPM 1.2 command, `unknown` otherwise. */
export function commandName(command: Uint8Array): string {
  if (command.length < 10) return 'unknown';
  const tag = (command[0]! << 8) | command[1]!;
  if (tag === 0x00c1 || tag === 0x00c2 || tag === 0x00c3) return 'tpm12';
  if (tag !== 0x8001 && tag !== 0x8002) return 'unknown';
  const cc = ((command[6]! << 24) | (command[7]! << 16) | (command[8]! << 8) | command[9]!) >>> 0;
  return CC[cc] ?? 'unknown';
}
