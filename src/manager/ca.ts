// The host's EK certificate authority (docs/ek-certificates.md). Either made by the manager at its first
// start (a root and an issuing intermediate, as swtpm_localca keeps them, in <state>/ca/, keys 0600, or
// encrypted under the master key when that is sealed to a TPM), or an operator's CA given as a directory
// holding cert.pem (the issuing certificate, then its chain) and key.pem. A CA that cannot be used as it
// stands (unreadable, corrupt, a key that is not the certificate's, not a CA) is refused naming the file.
// X.509 is @peculiar/x509 over Node's WebCrypto; no ASN.1 is put together by hand.
import 'reflect-metadata';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as x509 from '@peculiar/x509';
import { AsnConvert } from '@peculiar/asn1-schema';
import { Attribute, Certificate as AsnCertificate, Extension as AsnExtension, Extensions, GeneralName, GeneralNames, Name as AsnName, SubjectAlternativeName, SubjectDirectoryAttributes } from '@peculiar/asn1-x509';
import { AttCertIssuer, AttCertValidityPeriod, AttCertVersion, AttributeCertificate, AttributeCertificateInfo, Holder, IssuerSerial, V2Form } from '@peculiar/asn1-x509-attr';
import { Integer, ObjectIdentifier, Sequence, Utf8String } from 'asn1js';
import type { EkPublic } from '../tpm/ek-commands.js';
import type { TpmIdentity } from '../tpm/ek-manufacture.js';
import type { Tpm12Identity } from '../tpm/ek12.js';
import { fsyncDirSync, replaceDurableSync } from '../util/durable.js';
import { CA_DIR, OPERATOR_CERT, OPERATOR_KEY, type PlatformIdentity } from './ca-files.js';

x509.cryptoProvider.set(crypto.webcrypto as unknown as Crypto);

export type CaErrorCode = 'UNREADABLE' | 'CORRUPT' | 'MISMATCH' | 'NOT_CA';

export class CaError extends Error {
  constructor(
    readonly code: CaErrorCode,
    readonly file: string,
    message: string,
  ) {
    super(message);
    this.name = 'CaError';
  }
}

/** TCG OIDs (EK Credential Profile 2.0, section 2.5). */
export const TCG_OID = {
  tpmManufacturer: '2.23.133.2.1',
  tpmModel: '2.23.133.2.2',
  tpmVersion: '2.23.133.2.3',
  tpmSpecification: '2.23.133.2.16',
  ekCertificate: '2.23.133.8.1',
  tcgCredentialType: '2.23.133.2.25',
  platformAttributeCertificate: '2.23.133.8.2',
  platformManufacturerStr: '2.23.133.5.1.1',
  platformModel: '2.23.133.5.1.4',
  platformVersion: '2.23.133.5.1.5',
} as const;


export { CA_CHAIN_FILE, CA_DIR, OPERATOR_CERT, OPERATOR_KEY } from './ca-files.js';
const ROOT_CERT = 'root.pem';
const ROOT_KEY = 'root.key';
const ISSUER_CERT = 'issuer.pem';
const ISSUER_KEY = 'issuer.key';
const SEALED = '.sealed';
const EK_NOT_AFTER = new Date('9999-12-31T23:59:59Z');
const CA_YEARS = 30;

interface Signer {
  cert: x509.X509Certificate;
  key: CryptoKey;
  alg: RsaHashedImportParams | EcdsaParams;
}

function serial(): string {
  const b = crypto.randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x01; // positive, 16 bytes, never zero
  return b.toString('hex');
}

function read(file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new CaError('UNREADABLE', file, `CA file ${file} cannot be read: ${(err as Error).message}`);
  }
}

/** The WebCrypto signing algorithm of a private key, and the key imported for it. */
async function importSigningKey(file: string, pem: string | Buffer): Promise<{ key: CryptoKey; alg: RsaHashedImportParams | EcdsaParams; obj: crypto.KeyObject }> {
  let obj: crypto.KeyObject;
  try {
    obj = crypto.createPrivateKey(pem);
  } catch (err) {
    throw new CaError('CORRUPT', file, `CA key ${file} is not a PEM private key: ${(err as Error).message}`);
  }
  const der = obj.export({ type: 'pkcs8', format: 'der' });
  let alg: RsaHashedImportParams | (EcKeyImportParams & EcdsaParams);
  if (obj.asymmetricKeyType === 'rsa') alg = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
  else if (obj.asymmetricKeyType === 'ec' && (obj.asymmetricKeyDetails?.namedCurve === 'prime256v1' || obj.asymmetricKeyDetails?.namedCurve === 'secp384r1')) {
    const p384 = obj.asymmetricKeyDetails.namedCurve === 'secp384r1';
    alg = { name: 'ECDSA', namedCurve: p384 ? 'P-384' : 'P-256', hash: p384 ? 'SHA-384' : 'SHA-256' };
  } else throw new CaError('CORRUPT', file, `CA key ${file} is a ${obj.asymmetricKeyType ?? 'unknown'} key; RSA, EC P-256 or EC P-384 are supported`);
  const key = await crypto.webcrypto.subtle.importKey('pkcs8', der, alg, false, ['sign']);
  return { key: key as unknown as CryptoKey, alg, obj };
}

function parseCerts(file: string, pem: string): x509.X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new CaError('CORRUPT', file, `CA certificate file ${file} holds no PEM certificate`);
  return blocks.map((b, i) => {
    try {
      return new x509.X509Certificate(b);
    } catch (err) {
      throw new CaError('CORRUPT', file, `certificate ${i + 1} in ${file} cannot be parsed: ${(err as Error).message}`);
    }
  });
}

function spki(k: crypto.KeyObject): Buffer {
  return (k.type === 'public' ? k : crypto.createPublicKey(k)).export({ type: 'spki', format: 'der' });
}

/** Key and certificate must be one pair, and the certificate a CA: checked before anything is signed. */
function checkPair(certFile: string, keyFile: string, cert: x509.X509Certificate, key: crypto.KeyObject): void {
  const certKey = crypto.createPublicKey({ key: Buffer.from(cert.publicKey.rawData), format: 'der', type: 'spki' });
  if (!spki(certKey).equals(spki(key))) throw new CaError('MISMATCH', keyFile, `CA key ${keyFile} does not belong to the certificate in ${certFile} (${cert.subject})`);
  const bc = cert.getExtension(x509.BasicConstraintsExtension);
  if (!bc?.ca) throw new CaError('NOT_CA', certFile, `certificate ${cert.subject} in ${certFile} is not a CA (basicConstraints CA:TRUE missing)`);
}

/** A private key at rest: PEM, or with `wrap` AES-256-GCM (iv 12 | tag 16 | ciphertext) under a key derived from the master key. */
function writeKey(file: string, obj: crypto.KeyObject, wrap: Buffer | null): void {
  const pem = Buffer.from(obj.export({ type: 'pkcs8', format: 'pem' }) as string);
  let out = pem;
  if (wrap) {
    const iv = crypto.randomBytes(12);
    const c = crypto.createCipheriv('aes-256-gcm', wrap, iv);
    c.setAAD(Buffer.from(path.basename(file)));
    const body = Buffer.concat([c.update(pem), c.final()]);
    out = Buffer.concat([iv, c.getAuthTag(), body]);
  }
  replaceDurableSync(file, out, 0o600);
}

function readKey(file: string, wrap: Buffer | null): Buffer {
  const raw = read(file);
  if (!wrap) return raw;
  if (raw.length < 28) throw new CaError('CORRUPT', file, `sealed CA key ${file} is ${raw.length} bytes, too short`);
  const d = crypto.createDecipheriv('aes-256-gcm', wrap, raw.subarray(0, 12));
  d.setAAD(Buffer.from(path.basename(file)));
  d.setAuthTag(raw.subarray(12, 28));
  try {
    return Buffer.concat([d.update(raw.subarray(28)), d.final()]);
  } catch {
    throw new CaError('CORRUPT', file, `sealed CA key ${file} fails authentication (edited, or sealed under another master key)`);
  }
}

export interface CaOptions {
  stateDir: string;
  /** An operator's CA directory (cert.pem, key.pem); absent: the host's own CA in <state>/ca. */
  operatorDir?: string;
  /** Encrypts the host CA's keys at rest (with --seal-to-tpm: derived from the sealed master key). */
  wrapKey?: Buffer;
}

export class EkCa {
  private constructor(
    readonly signer: Signer,
    /** PEM, the issuing certificate first, the root last: what a verifier needs. */
    readonly chainPem: string,
    readonly source: string,
  ) {}

  /** Load the CA (making the host's own at the first start); `created` says it was made now. */
  static async open(o: CaOptions): Promise<{ ca: EkCa; created: boolean }> {
    if (o.operatorDir) return { ca: await EkCa.#operator(o.operatorDir), created: false };
    const dir = path.join(o.stateDir, CA_DIR);
    const wrap = o.wrapKey ?? null;
    const sfx = wrap ? SEALED : '';
    const issuerKey = path.join(dir, ISSUER_KEY + sfx);
    const otherForm = path.join(dir, ISSUER_KEY + (wrap ? '' : SEALED));
    if (!fs.existsSync(issuerKey) && fs.existsSync(otherForm))
      throw new CaError('UNREADABLE', otherForm, `the host CA key is ${otherForm}, kept ${wrap ? 'unsealed' : 'sealed to a TPM'}; start the manager the way it was first started`);
    let created = false;
    if (!fs.existsSync(path.join(dir, ISSUER_CERT))) {
      await EkCa.#make(dir, wrap);
      created = true;
    }
    const root = parseCerts(path.join(dir, ROOT_CERT), read(path.join(dir, ROOT_CERT)).toString('utf8'))[0]!;
    const issuerFile = path.join(dir, ISSUER_CERT);
    const issuer = parseCerts(issuerFile, read(issuerFile).toString('utf8'))[0]!;
    const k = await importSigningKey(issuerKey, readKey(issuerKey, wrap));
    checkPair(issuerFile, issuerKey, issuer, k.obj);
    return { ca: new EkCa({ cert: issuer, key: k.key, alg: k.alg }, `${issuer.toString('pem')}\n${root.toString('pem')}\n`, dir), created };
  }

  static async #operator(dir: string): Promise<EkCa> {
    const certFile = path.join(dir, OPERATOR_CERT);
    const keyFile = path.join(dir, OPERATOR_KEY);
    const certs = parseCerts(certFile, read(certFile).toString('utf8'));
    const k = await importSigningKey(keyFile, read(keyFile));
    checkPair(certFile, keyFile, certs[0]!, k.obj);
    return new EkCa({ cert: certs[0]!, key: k.key, alg: k.alg }, `${certs.map((c) => c.toString('pem')).join('\n')}\n`, dir);
  }

  /** A root (pathlen 1) and an issuing intermediate (pathlen 0), RSA 2048, as swtpm_localca makes them. */
  static async #make(dir: string, wrap: Buffer | null): Promise<void> {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fsyncDirSync(path.dirname(dir));
    const alg = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256', publicExponent: new Uint8Array([1, 0, 1]), modulusLength: 2048 };
    const notBefore = new Date();
    const notAfter = new Date(notBefore.getTime() + CA_YEARS * 365.25 * 86400_000);
    const caUsage = new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true);
    const rootKeys = await crypto.webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']);
    const rootName = 'CN=vtpm-split local CA root,O=vtpm-split';
    const root = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: serial(),
      name: rootName,
      notBefore,
      notAfter,
      signingAlgorithm: alg,
      keys: rootKeys as unknown as CryptoKeyPair,
      extensions: [new x509.BasicConstraintsExtension(true, 1, true), caUsage, await x509.SubjectKeyIdentifierExtension.create(rootKeys.publicKey as unknown as CryptoKey)],
    });
    const issuerKeys = await crypto.webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']);
    const issuer = await x509.X509CertificateGenerator.create({
      serialNumber: serial(),
      subject: 'CN=vtpm-split EK issuing CA,O=vtpm-split',
      issuer: root.subject,
      notBefore,
      notAfter,
      signingAlgorithm: alg,
      publicKey: issuerKeys.publicKey as unknown as CryptoKey,
      signingKey: rootKeys.privateKey as unknown as CryptoKey,
      extensions: [
        new x509.BasicConstraintsExtension(true, 0, true),
        caUsage,
        await x509.SubjectKeyIdentifierExtension.create(issuerKeys.publicKey as unknown as CryptoKey),
        await x509.AuthorityKeyIdentifierExtension.create(root),
      ],
    });
    const keyObj = (k: crypto.webcrypto.CryptoKey): crypto.KeyObject => crypto.KeyObject.from(k);
    const sfx = wrap ? SEALED : '';
    // Keys first, certificates last: a crash in between leaves no issuer.pem, and the next start makes a new CA.
    writeKey(path.join(dir, ROOT_KEY + sfx), keyObj(rootKeys.privateKey), wrap);
    writeKey(path.join(dir, ISSUER_KEY + sfx), keyObj(issuerKeys.privateKey), wrap);
    replaceDurableSync(path.join(dir, ROOT_CERT), Buffer.from(root.toString('pem') + '\n'), 0o644);
    replaceDurableSync(path.join(dir, ISSUER_CERT), Buffer.from(issuer.toString('pem') + '\n'), 0o644);
  }

  /** The EK certificate of one TPM 2.0 (EK Credential Profile 2.0, section 3.2). */
  async issueEk(pub: EkPublic, tpm: TpmIdentity, vmUuid: string): Promise<Uint8Array> {
    const jwk: crypto.JsonWebKeyInput['key'] =
      pub.alg === 'rsa'
        ? { kty: 'RSA', n: Buffer.from(pub.modulus).toString('base64url'), e: Buffer.from([1, 0, 1]).toString('base64url') }
        : { kty: 'EC', crv: 'P-256', x: Buffer.from(pub.x).toString('base64url'), y: Buffer.from(pub.y).toString('base64url') };
    const spkiDer = crypto.createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'der' });
    return this.#issue({
      subject: `CN=${vmUuid}`,
      spki: Uint8Array.from(spkiDer).buffer,
      keyUsage: pub.alg === 'rsa' ? x509.KeyUsageFlags.keyEncipherment : x509.KeyUsageFlags.keyAgreement,
      san: [hex8(tpm.manufacturer), tpm.model, hex8(tpm.firmware[0])],
      spec: tpm.spec,
    });
  }

  /**
   * The EK certificate of one TPM 1.2 (TCG Credential Profile 1.2): an empty subject (the profile's
   * rule; the critical subjectAltName names the TPM) and tpmSpecification "1.2". The key is typed
   * rsaEncryption, as swtpm_localca types it: the profile's id-RSAES-OAEP typing is one OpenSSL cannot
   * load, and a verifier would then refuse the whole chain.
   */
  async issueEk12(modulus: Uint8Array, tpm: Tpm12Identity): Promise<Uint8Array> {
    const spki = crypto.createPublicKey({ key: { kty: 'RSA', n: Buffer.from(modulus).toString('base64url'), e: 'AQAB' }, format: 'jwk' }).export({ type: 'spki', format: 'der' });
    return this.#issue({
      subject: '',
      spki: Uint8Array.from(spki).buffer,
      keyUsage: x509.KeyUsageFlags.keyEncipherment,
      san: [hex8(tpm.manufacturer), TPM12_MODEL, hex8(((tpm.firmware[0] << 8) | tpm.firmware[1]) >>> 0)],
      spec: { family: '1.2', level: tpm.specLevel, revision: TPM12_REVISION[tpm.errataRev] ?? tpm.errataRev },
    });
  }

  /**
   * The TCG Platform Certificate of a VM's platform (Platform Credential Profile): an X.509 attribute
   * certificate (RFC 5755) whose holder is the EK certificate (its issuer and serial), the platform's
   * manufacturer, model and version in its subjectAltName, credential type
   * tcg-kp-PlatformAttributeCertificate. Built from @peculiar/asn1-x509-attr's schema; signed by the
   * issuing CA over the DER of its AttributeCertificateInfo.
   */
  async issuePlatform(ekCertDer: Uint8Array, p: PlatformIdentity): Promise<Uint8Array> {
    const ek = AsnConvert.parse(ekCertDer, AsnCertificate).tbsCertificate;
    const dn = new x509.Name([
      { [TCG_OID.platformManufacturerStr]: [{ utf8String: p.manufacturer }] },
      { [TCG_OID.platformModel]: [{ utf8String: p.model }] },
      { [TCG_OID.platformVersion]: [{ utf8String: p.version }] },
    ]);
    const san = new x509.Extension('2.5.29.17', false, AsnConvert.serialize(new SubjectAlternativeName([new GeneralName({ directoryName: AsnConvert.parse(dn.toArrayBuffer(), AsnName) })])));
    const aki = await x509.AuthorityKeyIdentifierExtension.create(this.signer.cert);
    const sigAlg = new x509.AlgorithmProvider().toAsnAlgorithm(this.signer.alg);
    const credentialType = new Sequence({ value: [new ObjectIdentifier({ value: TCG_OID.platformAttributeCertificate })] }).toBER();
    const holderId = new IssuerSerial({ issuer: new GeneralNames([new GeneralName({ directoryName: ek.issuer })]), serial: ek.serialNumber });
    // The schema defaults issuerUID to an empty BIT STRING; the EK certificate has none, so it is left out.
    Reflect.deleteProperty(holderId, 'issuerUID');
    const acinfo = new AttributeCertificateInfo({
      version: AttCertVersion.v2,
      holder: new Holder({ baseCertificateID: holderId }),
      issuer: new AttCertIssuer({ v2Form: new V2Form({ issuerName: new GeneralNames([new GeneralName({ directoryName: AsnConvert.parse(this.signer.cert.subjectName.toArrayBuffer(), AsnName) })]) }) }),
      signature: sigAlg,
      serialNumber: Uint8Array.from(Buffer.from(serial(), 'hex')).buffer,
      attrCertValidityPeriod: new AttCertValidityPeriod({ notBeforeTime: new Date(Math.floor(Date.now() / 1000) * 1000), notAfterTime: EK_NOT_AFTER }),
      attributes: [new Attribute({ type: TCG_OID.tcgCredentialType, values: [credentialType] })],
      extensions: new Extensions([san, aki].map((e) => AsnConvert.parse(e.rawData, AsnExtension))),
    });
    const hash = (this.signer.alg.hash as string).replace('-', '').toLowerCase();
    const signature = crypto.sign(hash, Buffer.from(AsnConvert.serialize(acinfo)), { key: crypto.KeyObject.from(this.signer.key as unknown as crypto.webcrypto.CryptoKey), dsaEncoding: 'der' });
    return new Uint8Array(AsnConvert.serialize(new AttributeCertificate({ acinfo, signatureAlgorithm: sigAlg, signatureValue: Uint8Array.from(signature).buffer })));
  }

  async #issue(o: { subject: string; spki: ArrayBuffer; keyUsage: x509.KeyUsageFlags; san: [string, string, string]; spec: TpmIdentity['spec'] }): Promise<Uint8Array> {
    // subjectAltName: directoryName {tpmManufacturer, tpmModel, tpmVersion}, UTF8Strings (profile 3.2.9).
    const dn = new x509.Name([
      { [TCG_OID.tpmManufacturer]: [{ utf8String: o.san[0] }] },
      { [TCG_OID.tpmModel]: [{ utf8String: o.san[1] }] },
      { [TCG_OID.tpmVersion]: [{ utf8String: o.san[2] }] },
    ]);
    const san = new SubjectAlternativeName([new GeneralName({ directoryName: AsnConvert.parse(dn.toArrayBuffer(), AsnName) })]);
    // subjectDirectoryAttributes: tpmSpecification {family, level, revision} (profile 3.2.13).
    const spec = new Sequence({ value: [new Utf8String({ value: o.spec.family }), new Integer({ value: o.spec.level }), new Integer({ value: o.spec.revision })] }).toBER();
    const sda = new SubjectDirectoryAttributes([new Attribute({ type: TCG_OID.tpmSpecification, values: [spec] })]);
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serial(),
      subject: o.subject,
      issuer: this.signer.cert.subject,
      notBefore: new Date(),
      notAfter: EK_NOT_AFTER,
      signingAlgorithm: this.signer.alg,
      publicKey: o.spki,
      signingKey: this.signer.key,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(o.keyUsage, true),
        new x509.ExtendedKeyUsageExtension([TCG_OID.ekCertificate], false),
        // Critical as swtpm_localca marks it (the profile requires it when the subject is empty).
        new x509.Extension('2.5.29.17', true, AsnConvert.serialize(san)),
        new x509.Extension('2.5.29.9', false, AsnConvert.serialize(sda)),
        await x509.AuthorityKeyIdentifierExtension.create(this.signer.cert),
      ],
    });
    return new Uint8Array(cert.rawData);
  }
}

const hex8 = (n: number): string => `id:${(n >>> 0).toString(16).toUpperCase().padStart(8, '0')}`;
/** A TPM 1.2 reports no model; libtpms' own name for itself (TPMLIB_GetInfo) stands in. */
const TPM12_MODEL = 'swtpm';
/** TPM 1.2 errataRev to the specification revision it names (1.2 rev 94, 103, 116). */
const TPM12_REVISION: Record<number, number> = { 0: 85, 1: 94, 2: 103, 3: 116 };
