// The EK CA: the host CA made once (keys 0600, or sealed under a wrap key), an operator's CA checked
// before use (each refusal names the file), and EK certificates that openssl verifies against the chain
// and that carry the TCG EK Credential Profile's fields.
import 'reflect-metadata';
import { afterAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { CaError, EkCa, TCG_OID } from '../../src/manager/ca.js';
import type { EkPublic } from '../../src/tpm/ek-commands.js';
import type { TpmIdentity } from '../../src/tpm/ek-manufacture.js';
import { tempDir, removeDir } from '../helpers/temp.js';
import { checkPlatformCert } from '../helpers/attr-cert.js';

const work = tempDir('ca');
afterAll(() => removeDir(work));
let n = 0;
const dir = (): string => {
  const d = join(work, `d${n++}`);
  fs.mkdirSync(d);
  return d;
};
const VM = '6f1c7c1e-1111-4222-8333-444455556666';
const TPM: TpmIdentity = { manufacturer: 0x49424d00, model: 'SW  ', firmware: [0x20191023, 0x163636], spec: { family: '2.0', level: 0, revision: 164 } };

function rsaEk(): EkPublic {
  const { publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = publicKey.export({ format: 'jwk' });
  return { alg: 'rsa', modulus: Buffer.from(jwk.n!, 'base64url'), exponent: 65537 };
}

function eccEk(): EkPublic {
  const { publicKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = publicKey.export({ format: 'jwk' });
  return { alg: 'ecc', curve: 'P-256', x: Buffer.from(jwk.x!, 'base64url'), y: Buffer.from(jwk.y!, 'base64url') };
}

/** An operator CA made with openssl: DIR/cert.pem, DIR/key.pem. */
function opensslCa(d: string, opts: { ca?: boolean; subj?: string } = {}): void {
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(d, 'key.pem'), '-out', join(d, 'cert.pem'), '-days', '30',
    '-subj', opts.subj ?? '/CN=operator EK CA', '-addext', `basicConstraints=critical,CA:${opts.ca === false ? 'FALSE' : 'TRUE'}`,
  ], { stdio: 'ignore' });
}

function verify(chainPem: string, der: Uint8Array): string {
  const d = dir();
  fs.writeFileSync(join(d, 'chain.pem'), chainPem);
  fs.writeFileSync(join(d, 'ek.pem'), new x509.X509Certificate(new Uint8Array(der)).toString('pem'));
  return execFileSync('openssl', ['verify', '-CAfile', join(d, 'chain.pem'), join(d, 'ek.pem')], { encoding: 'utf8' }).trim();
}

describe('the host CA', () => {
  it('is made once: a root and an issuing CA, keys 0600; the next open loads the same chain', async () => {
    const state = dir();
    const a = await EkCa.open({ stateDir: state });
    expect(a.created).toBe(true);
    for (const f of ['root.key', 'issuer.key']) expect(fs.statSync(join(state, 'ca', f)).mode & 0o777).toBe(0o600);
    const b = await EkCa.open({ stateDir: state });
    expect(b.created).toBe(false);
    expect(b.ca.chainPem).toBe(a.ca.chainPem);
    const [issuer, root] = x509.PemConverter.decode(a.ca.chainPem).map((d) => new x509.X509Certificate(d));
    expect(issuer!.issuer).toBe(root!.subject);
    expect(issuer!.getExtension(x509.BasicConstraintsExtension)).toMatchObject({ ca: true, pathLength: 0, critical: true });
    expect(root!.getExtension(x509.BasicConstraintsExtension)).toMatchObject({ ca: true, pathLength: 1, critical: true });
  });

  it('issues EK certificates with the TCG profile fields that openssl verifies against the chain', async () => {
    const { ca } = await EkCa.open({ stateDir: dir() });
    for (const pub of [rsaEk(), eccEk()]) {
      const der = await ca.issueEk(pub, TPM, VM);
      expect(verify(ca.chainPem, der)).toMatch(/: OK$/);
      const c = new x509.X509Certificate(new Uint8Array(der));
      expect(c.subject).toBe(`CN=${VM}`);
      expect(c.notAfter.toISOString()).toBe('9999-12-31T23:59:59.000Z');
      expect(c.getExtension(x509.BasicConstraintsExtension)).toMatchObject({ ca: false, critical: true });
      expect(c.getExtension(x509.KeyUsagesExtension)).toMatchObject({ usages: pub.alg === 'rsa' ? x509.KeyUsageFlags.keyEncipherment : x509.KeyUsageFlags.keyAgreement, critical: true });
      expect(c.getExtension(x509.ExtendedKeyUsageExtension)?.usages).toEqual([TCG_OID.ekCertificate]);
      const text = execFileSync('openssl', ['x509', '-inform', 'der', '-noout', '-text'], { input: der, encoding: 'utf8' });
      expect(text).toContain('X509v3 Subject Alternative Name: critical');
      expect(text).toContain('DirName:/2.23.133.2.1=id:49424D00/2.23.133.2.2=SW  /2.23.133.2.3=id:20191023');
      // The SAN's strings are UTF8String, as the profile asks: 0c = UTF8String tag, 0b = 11 bytes, "id:49424D00".
      expect(Buffer.from(c.getExtension('2.5.29.17')!.value).toString('hex')).toContain('0c0b' + Buffer.from('id:49424D00').toString('hex'));
      // subjectDirectoryAttributes: tpmSpecification {UTF8String "2.0", level 0, revision 164}.
      expect(Buffer.from(c.getExtension('2.5.29.9')!.value).toString('hex')).toBe('3019' + '3017' + '06056781050210' + '310e' + '300c' + '0c03322e30' + '020100' + '020200a4');
    }
  });
});

describe('keys at rest under a wrap key (the master key sealed to a TPM)', () => {
  it('keeps no PEM on disk, reopens with the same key, and refuses another key or a missing wrap naming the file', async () => {
    const state = dir();
    const wrap = crypto.randomBytes(32);
    await EkCa.open({ stateDir: state, wrapKey: wrap });
    const sealed = join(state, 'ca', 'issuer.key.sealed');
    expect(fs.readFileSync(sealed).includes('PRIVATE KEY')).toBe(false);
    expect(fs.existsSync(join(state, 'ca', 'issuer.key'))).toBe(false);
    expect((await EkCa.open({ stateDir: state, wrapKey: wrap })).created).toBe(false);
    await expect(EkCa.open({ stateDir: state, wrapKey: crypto.randomBytes(32) })).rejects.toMatchObject({ code: 'CORRUPT', file: sealed });
    await expect(EkCa.open({ stateDir: state })).rejects.toMatchObject({ code: 'UNREADABLE', file: sealed });
  });
});

describe("an operator's CA (--ca DIR)", () => {
  it('signs with it: openssl verifies the EK certificate against cert.pem', async () => {
    const d = dir();
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(d, 'key.pem'), '-out', join(d, 'cert.pem'), '-days', '30', '-subj', '/CN=operator EC CA', '-addext', 'basicConstraints=critical,CA:TRUE'], { stdio: 'ignore' });
    const { ca } = await EkCa.open({ stateDir: dir(), operatorDir: d });
    expect(verify(ca.chainPem, await ca.issueEk(rsaEk(), TPM, VM))).toMatch(/: OK$/);
  }, 30_000);

  it('refuses a key that is not the certificate\'s, a corrupt certificate, a missing key and a non-CA certificate, naming the file', async () => {
    const a = dir();
    const b = dir();
    opensslCa(a);
    opensslCa(b);
    fs.copyFileSync(join(b, 'key.pem'), join(a, 'key.pem'));
    const st = dir();
    await expect(EkCa.open({ stateDir: st, operatorDir: a })).rejects.toThrow(new CaError('MISMATCH', join(a, 'key.pem'), `CA key ${join(a, 'key.pem')} does not belong to the certificate in ${join(a, 'cert.pem')} (CN=operator EK CA)`));
    fs.writeFileSync(join(b, 'cert.pem'), '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n');
    await expect(EkCa.open({ stateDir: st, operatorDir: b })).rejects.toMatchObject({ code: 'CORRUPT', file: join(b, 'cert.pem') });
    const c = dir();
    opensslCa(c);
    fs.rmSync(join(c, 'key.pem'));
    await expect(EkCa.open({ stateDir: st, operatorDir: c })).rejects.toMatchObject({ code: 'UNREADABLE', file: join(c, 'key.pem') });
    fs.writeFileSync(join(c, 'key.pem'), 'not a key');
    await expect(EkCa.open({ stateDir: st, operatorDir: c })).rejects.toMatchObject({ code: 'CORRUPT', file: join(c, 'key.pem') });
    const e = dir();
    opensslCa(e, { ca: false });
    await expect(EkCa.open({ stateDir: st, operatorDir: e })).rejects.toMatchObject({ code: 'NOT_CA', file: join(e, 'cert.pem') });
  }, 30_000);
});

describe('the platform certificate', () => {
  it('is an attribute certificate held by the EK certificate, signed by the issuing CA (checked with openssl), naming the platform', async () => {
    const { ca } = await EkCa.open({ stateDir: dir() });
    const ek = new x509.X509Certificate(new Uint8Array(await ca.issueEk(rsaEk(), TPM, VM)));
    const der = await ca.issuePlatform(new Uint8Array(ek.rawData), { manufacturer: 'ACME', model: 'Anvil 9', version: '2.1' });
    const issuerPem = ca.chainPem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/)![0];
    const v = checkPlatformCert(der, issuerPem, dir());
    expect(v.signature).toBe('Verified OK');
    expect(v.holderIssuer).toBe(ek.issuer);
    expect(v.holderSerial).toBe(ek.serialNumber.toLowerCase());
    expect(v.issuer).toBe('CN=vtpm-split EK issuing CA, O=vtpm-split');
    expect(v.san).toBe('2.23.133.5.1.1=ACME, 2.23.133.5.1.4=Anvil 9, 2.23.133.5.1.5=2.1');
    // tcgCredentialType: SEQUENCE { tcg-kp-PlatformAttributeCertificate 2.23.133.8.2 }.
    expect(v.attributes).toEqual(['2.23.133.2.25=3007060567810508' + '02']);
    expect(v.notAfter).toBe('9999-12-31T23:59:59.000Z');
    // Not a public-key certificate: openssl's X.509 parser refuses it.
    const f = join(dir(), 'p.der');
    fs.writeFileSync(f, der);
    expect(() => execFileSync('openssl', ['x509', '-inform', 'der', '-in', f, '-noout'], { stdio: 'pipe' })).toThrow();
  });
});

describe('the platform certificate from an operator EC CA', () => {
  it('is signed with ECDSA P-256 / SHA-256 that openssl verifies', async () => {
    const d = dir();
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(d, 'key.pem'), '-out', join(d, 'cert.pem'), '-days', '30', '-subj', '/CN=ec op CA', '-addext', 'basicConstraints=critical,CA:TRUE'], { stdio: 'ignore' });
    const { ca } = await EkCa.open({ stateDir: dir(), operatorDir: d });
    const ek = new x509.X509Certificate(new Uint8Array(await ca.issueEk(rsaEk(), TPM, VM)));
    const v = checkPlatformCert(await ca.issuePlatform(new Uint8Array(ek.rawData), { manufacturer: 'm', model: 'n', version: 'v' }), fs.readFileSync(join(d, 'cert.pem'), 'utf8'), dir());
    expect(v.signature).toBe('Verified OK');
    expect(v.issuer).toBe('CN=ec op CA');
  });
});
