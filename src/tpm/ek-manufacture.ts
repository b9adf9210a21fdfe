// Manufacture of a TPM 2.0's endorsement credentials, done once on a TPM no one has seen, in two halves:
// deriveEks (the EK public keys from the TCG default templates; may run ahead of time) and provisionEk
// (certificates from an issuer, the caller's CA, written into the TCG indices by the platform and
// locked, then Shutdown(CLEAR)). Every step must succeed: the caller discards the TPM on any error, so
// no VM starts with half its credentials.
import { shutdown, startup, TPM_SU_CLEAR } from './tpm2-commands.js';
import {
  EK_CERT_INDEX,
  NV_WRITE_CHUNK,
  PLATFORM_CERT_INDEX,
  TPM_PT,
  createPrimaryEk,
  flushContext,
  getProperties,
  nvDefinePlatform,
  nvWriteLockPlatform,
  nvWritePlatform,
  parseCreatePrimaryEk,
  parseProperties,
  type EkAlg,
  type EkPublic,
} from './ek-commands.js';
import { responseCode } from './wire.js';

export type EkProfile = 'rsa' | 'ecc' | 'both';

export function ekAlgs(p: EkProfile): EkAlg[] {
  return p === 'both' ? ['rsa', 'ecc'] : [p];
}

/** What an EK certificate says about the TPM (its subjectAltName, EK Credential Profile 3.2.9). */
export interface TpmIdentity {
  /** TPM_PT_MANUFACTURER as 4 ASCII bytes' u32 ("IBM " for libtpms). */
  manufacturer: number;
  /** TPM_PT_VENDOR_STRING_1 (the model). */
  model: string;
  /** FIRMWARE_VERSION_1 and _2. */
  firmware: [number, number];
  /** The TPM specification it implements: family "2.0", level, revision (e.g. 164 for 1.64). */
  spec: { family: string; level: number; revision: number };
}

export interface EkIssuer {
  issue(pub: EkPublic, tpm: TpmIdentity): Promise<Uint8Array>;
  /** The platform certificate whose holder is this EK certificate; absent: none is made. */
  platform?(ekCert: Uint8Array): Promise<Uint8Array>;
}

export type ManufactureErrorCode = 'TPM' | 'TOO_LARGE';

export class ManufactureError extends Error {
  constructor(
    readonly code: ManufactureErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ManufactureError';
  }
}

export interface Executor {
  execute(cmd: Uint8Array): Promise<Uint8Array>;
}

/** Runs one manufacturing command; any TPM error aborts manufacture (the VM must not start half-made). */
export async function run(tpm: Executor, cmd: Uint8Array, what: string): Promise<Uint8Array> {
  const rsp = await tpm.execute(cmd);
  const rc = responseCode(rsp);
  if (rc !== 0) throw new ManufactureError('TPM', `${what} failed with TPM response code 0x${rc.toString(16)}`);
  return rsp;
}

function ascii4(x: number): string {
  return String.fromCharCode((x >>> 24) & 0xff, (x >>> 16) & 0xff, (x >>> 8) & 0xff, x & 0xff).replace(/\0+$/, '');
}

export async function readTpmIdentity(tpm: Executor): Promise<TpmIdentity & { nvIndexMax: number }> {
  const props = parseProperties(await run(tpm, getProperties(TPM_PT.FAMILY_INDICATOR, TPM_PT.NV_INDEX_MAX - TPM_PT.FAMILY_INDICATOR + 1), 'GetCapability'));
  const get = (p: number): number => props.get(p) ?? 0;
  return {
    manufacturer: get(TPM_PT.MANUFACTURER),
    model: ascii4(get(TPM_PT.VENDOR_STRING_1)),
    firmware: [get(TPM_PT.FIRMWARE_VERSION_1), get(TPM_PT.FIRMWARE_VERSION_2)],
    spec: { family: ascii4(get(TPM_PT.FAMILY_INDICATOR)), level: get(TPM_PT.LEVEL), revision: get(TPM_PT.REVISION) },
    nvIndexMax: get(TPM_PT.NV_INDEX_MAX),
  };
}

/** The EK public key of a running TPM for one template (the object is flushed again). */
export async function ekPublic(tpm: Executor, alg: EkAlg): Promise<EkPublic> {
  const { handle, pub } = parseCreatePrimaryEk(await run(tpm, createPrimaryEk(alg), `CreatePrimary (${alg} EK)`), alg);
  await run(tpm, flushContext(handle), 'FlushContext');
  return pub;
}

/** Write `data` into a new platform index and lock it. */
export async function writeCertIndex(tpm: Executor, index: number, data: Uint8Array): Promise<void> {
  const hex = `0x${index.toString(16).padStart(8, '0')}`;
  await run(tpm, nvDefinePlatform(index, data.length), `NV_DefineSpace ${hex}`);
  for (let off = 0; off < data.length; off += NV_WRITE_CHUNK) await run(tpm, nvWritePlatform(index, data.subarray(off, off + NV_WRITE_CHUNK), off), `NV_Write ${hex}`);
  await run(tpm, nvWriteLockPlatform(index), `NV_WriteLock ${hex}`);
}

async function startupClear(tpm: Executor): Promise<void> {
  const rc = responseCode(await tpm.execute(startup(TPM_SU_CLEAR)));
  if (rc !== 0 && rc !== 0x100) throw new ManufactureError('TPM', `Startup failed with TPM response code 0x${rc.toString(16)}`);
}

/** What a TPM's certificates are made from: its identity and its EK public keys. */
export interface EkDerivation {
  id: TpmIdentity & { nvIndexMax: number };
  pubs: Map<EkAlg, EkPublic>;
}

/**
 * The first half, which can run ahead of time: Startup, the TPM's identity, the EK public keys (the RSA
 * one is most of manufacture's time). Leaves the TPM shut down (CLEAR); nothing is written to its NV.
 */
export async function deriveEks(tpm: Executor, algs: readonly EkAlg[]): Promise<EkDerivation> {
  await startupClear(tpm);
  const id = await readTpmIdentity(tpm);
  const pubs = new Map<EkAlg, EkPublic>();
  for (const alg of algs) pubs.set(alg, await ekPublic(tpm, alg));
  await run(tpm, shutdown(TPM_SU_CLEAR), 'Shutdown');
  return { id, pubs };
}

/**
 * The second half: certificates for the keys `d` holds (of `profile`) and, when the issuer makes one,
 * the platform certificate held by the first of them, each checked against the NV index size, then
 * written into their indices and locked; Startup before, Shutdown(CLEAR) after, as a TPM leaves the
 * factory. Returns the certificates written, by algorithm ('platform' for the platform certificate).
 */
export async function provisionEk(tpm: Executor, d: EkDerivation, profile: EkProfile, issuer: EkIssuer): Promise<Map<EkAlg | 'platform', Uint8Array>> {
  await startupClear(tpm);
  const certs = new Map<EkAlg | 'platform', Uint8Array>();
  for (const alg of ekAlgs(profile)) {
    const pub = d.pubs.get(alg);
    if (!pub) throw new ManufactureError('TPM', `no ${alg} EK was derived`);
    const der = await issuer.issue(pub, d.id);
    // The TPM would answer NV_DefineSpace with TPM_RC_SIZE; say what is too large, and by how much.
    if (der.length > d.id.nvIndexMax)
      throw new ManufactureError('TOO_LARGE', `the ${alg} EK certificate is ${der.length} bytes; an NV index of this TPM holds at most ${d.id.nvIndexMax}`);
    certs.set(alg, der);
  }
  const holder = certs.values().next().value;
  if (issuer.platform && holder) {
    const der = await issuer.platform(holder);
    if (der.length > d.id.nvIndexMax) throw new ManufactureError('TOO_LARGE', `the platform certificate is ${der.length} bytes; an NV index of this TPM holds at most ${d.id.nvIndexMax}`);
    certs.set('platform', der);
  }
  for (const [alg, der] of certs) await writeCertIndex(tpm, alg === 'platform' ? PLATFORM_CERT_INDEX : EK_CERT_INDEX[alg], der);
  await run(tpm, shutdown(TPM_SU_CLEAR), 'Shutdown');
  return certs;
}

/** Both halves at once, on a TPM 2.0 that was just manufactured and never started. */
export async function manufactureEk(tpm: Executor & { reset(): Promise<void> }, profile: EkProfile, issuer: EkIssuer): Promise<Map<EkAlg | 'platform', Uint8Array>> {
  const d = await deriveEks(tpm, ekAlgs(profile));
  // A TPM shut down takes Startup again only after a power cycle (TPM2_Startup after Shutdown without one is TPM_RC_INITIALIZE).
  await tpm.reset();
  return provisionEk(tpm, d, profile, issuer);
}
