// Field by field against the EK certificate Debian's swtpm_setup --create-ek-cert (swtpm_localca)
// makes for the same VM: what must agree agrees, and every difference is the one docs/ek-certificates.md
// lists. Ours is issued for the EK public key in swtpm's certificate, with libtpms' own identity; the
// same for a TPM 1.2, whose certificate also goes into NV behind the stored-certificate header.
import 'reflect-metadata';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { AsnConvert } from '@peculiar/asn1-schema';
import { SubjectAlternativeName } from '@peculiar/asn1-x509';
import { EkCa } from '../../src/manager/ca.js';
import { TpmHost } from '../../src/tpm/host.js';
import { readTpmIdentity } from '../../src/tpm/ek-manufacture.js';
import { startup } from '../../src/tpm/tpm2-commands.js';
import { startup as startup12 } from '../../src/tpm/tpm12-commands.js';
import { getVersionInfo, parseVersionInfo, storedCert } from '../../src/tpm/ek12.js';
import crypto from 'node:crypto';
import { tempStore } from '../tpm/helpers.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const VM = '11111111-2222-4333-8444-555555555555';
const work = tempDir('ek-swtpm');
let theirs: x509.X509Certificate;
let ours: x509.X509Certificate;

beforeAll(async () => {
  for (const d of ['ca', 'tpm', 'out']) fs.mkdirSync(join(work, d));
  fs.writeFileSync(join(work, 'localca.conf'), ['statedir', 'signingkey', 'issuercert', 'certserial'].map((k, i) => `${k} = ${join(work, 'ca', ['', 'signkey.pem', 'issuercert.pem', 'certserial'][i]!)}`).join('\n') + '\n');
  fs.writeFileSync(join(work, 'setup.conf'), `create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = ${join(work, 'localca.conf')}\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n`);
  execFileSync('swtpm_setup', ['--tpm2', '--tpmstate', join(work, 'tpm'), '--create-ek-cert', '--config', join(work, 'setup.conf'), '--vmid', VM, '--write-ek-cert-files', join(work, 'out')], { stdio: 'ignore', timeout: 120_000 });
  theirs = new x509.X509Certificate(fs.readFileSync(join(work, 'out', 'ek-rsa2048.crt')));
  const jwk = (await theirs.publicKey.export()) as CryptoKey;
  const exported = (await crypto.subtle.exportKey('jwk', jwk)) as JsonWebKey;
  const host = new TpmHost();
  const t = tempStore('ek-swtpm-tpm');
  try {
    const tpm = await host.create({ instance: 1, version: '2.0', store: t.store });
    await tpm.execute(startup());
    const id = await readTpmIdentity(tpm);
    const { ca } = await EkCa.open({ stateDir: join(work, 'ours') });
    ours = new x509.X509Certificate(new Uint8Array(await ca.issueEk({ alg: 'rsa', modulus: Buffer.from(exported.n!, 'base64url'), exponent: 65537 }, id, VM)));
  } finally {
    await host.destroyAll();
    t.cleanup();
  }
}, 180_000);

afterAll(() => removeDir(work));

const ext = (c: x509.X509Certificate, oid: string) => c.extensions.find((e) => e.type === oid);

describe('our EK certificate against swtpm_setup --create-ek-cert', () => {
  it('agrees on version, subject, validity end, key, signature algorithm, and the set of extensions with their criticality', () => {
    expect(ours.subject).toBe(theirs.subject);
    expect(ours.subject).toBe(`CN=${VM}`);
    expect(ours.notAfter.toISOString()).toBe(theirs.notAfter.toISOString());
    expect(Buffer.from(ours.publicKey.rawData).equals(Buffer.from(theirs.publicKey.rawData))).toBe(true);
    expect(ours.signatureAlgorithm).toEqual(theirs.signatureAlgorithm);
    const shape = (c: x509.X509Certificate) => c.extensions.map((e) => `${e.type}${e.critical ? ' critical' : ''}`).sort();
    expect(shape(ours)).toEqual(shape(theirs));
    expect(shape(ours)).toEqual(['2.5.29.15 critical', '2.5.29.17 critical', '2.5.29.19 critical', '2.5.29.35', '2.5.29.37', '2.5.29.9']);
  });

  it('has byte-identical key usage, basic constraints, extended key usage and tpmSpecification', () => {
    for (const oid of ['2.5.29.15', '2.5.29.19', '2.5.29.37', '2.5.29.9']) expect(Buffer.from(ext(ours, oid)!.value).toString('hex'), oid).toBe(Buffer.from(ext(theirs, oid)!.value).toString('hex'));
  });

  it('differs in the SAN values only (libtpms\' own TPM_PT_MANUFACTURER and vendor string, not swtpm\'s configured ones)', () => {
    const text = (c: x509.X509Certificate) => execFileSync('openssl', ['x509', '-noout', '-ext', 'subjectAltName'], { input: c.toString('pem'), encoding: 'utf8' });
    expect(text(theirs)).toContain('DirName:/2.23.133.2.1=id:00001014/2.23.133.2.2=swtpm/2.23.133.2.3=id:20191023');
    expect(text(ours)).toContain('DirName:/2.23.133.2.1=id:49424D00/2.23.133.2.2=SW  /2.23.133.2.3=id:20191023');
    // Same structure: one directoryName of three UTF8String attributes, same types in the same order.
    const shape = (c: x509.X509Certificate) =>
      AsnConvert.parse(ext(c, '2.5.29.17')!.value, SubjectAlternativeName).map((g) => (g.directoryName ?? []).map((rdn) => rdn.map((a) => `${a.type}:${Object.keys(a.value).filter((k) => (a.value as unknown as Record<string, unknown>)[k] !== undefined).join()}`)));
    expect(shape(ours)).toEqual(shape(theirs));
    expect(shape(ours).flat(2)).toEqual(['2.23.133.2.1:utf8String', '2.23.133.2.2:utf8String', '2.23.133.2.3:utf8String']);
    expect(theirs.issuer).toBe('CN=swtpm-localca');
    expect(ours.issuer).toBe('CN=vtpm-split EK issuing CA, O=vtpm-split');
  });
});

describe('our TPM 1.2 EK certificate against swtpm_setup (TPM 1.2) --create-ek-cert', () => {
  const w12 = tempDir('ek12-swtpm');
  let theirs12: x509.X509Certificate;
  let ours12: x509.X509Certificate;
  let stored: Buffer;

  beforeAll(async () => {
    for (const d of ['ca', 'tpm', 'out']) fs.mkdirSync(join(w12, d));
    fs.writeFileSync(join(w12, 'localca.conf'), ['statedir', 'signingkey', 'issuercert', 'certserial'].map((k, i) => `${k} = ${join(w12, 'ca', ['', 'signkey.pem', 'issuercert.pem', 'certserial'][i]!)}`).join('\n') + '\n');
    fs.writeFileSync(join(w12, 'setup.conf'), `create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = ${join(w12, 'localca.conf')}\ncreate_certs_tool_options = /etc/swtpm-localca.options\n`);
    // Without --tpm2, swtpm 0.7.1 manufactures a TPM 1.2.
    execFileSync('swtpm_setup', ['--tpmstate', join(w12, 'tpm'), '--create-ek-cert', '--config', join(w12, 'setup.conf'), '--vmid', VM, '--write-ek-cert-files', join(w12, 'out')], { stdio: 'ignore', timeout: 120_000 });
    theirs12 = new x509.X509Certificate(fs.readFileSync(join(w12, 'out', 'ek-rsa2048.crt')));
    const spki = crypto.createPublicKey({ key: Buffer.from(theirs12.publicKey.rawData), format: 'der', type: 'spki' }).export({ format: 'jwk' });
    const host = new TpmHost();
    const t = tempStore('ek12-swtpm-tpm');
    try {
      const tpm = await host.create({ instance: 1, version: '1.2', store: t.store });
      await tpm.execute(startup12());
      const id = parseVersionInfo(await tpm.execute(getVersionInfo()));
      const { ca } = await EkCa.open({ stateDir: join(w12, 'ours') });
      const der = await ca.issueEk12(Buffer.from(spki.n!, 'base64url'), id);
      ours12 = new x509.X509Certificate(new Uint8Array(der));
      stored = Buffer.from(storedCert(der));
    } finally {
      await host.destroyAll();
      t.cleanup();
    }
  }, 180_000);

  afterAll(() => removeDir(w12));

  it('agrees on version, the empty subject, validity end, key and the set of extensions with their criticality', () => {
    expect(theirs12.subject).toBe('');
    expect(ours12.subject).toBe('');
    expect(ours12.notAfter.toISOString()).toBe(theirs12.notAfter.toISOString());
    expect(Buffer.from(ours12.publicKey.rawData).equals(Buffer.from(theirs12.publicKey.rawData))).toBe(true);
    const shape = (c: x509.X509Certificate) => c.extensions.map((e) => `${e.type}${e.critical ? ' critical' : ''}`).sort();
    expect(shape(ours12)).toEqual(shape(theirs12));
  });

  it('has byte-identical key usage, basic constraints, extended key usage and tpmSpecification {"1.2", 2, 116}', () => {
    for (const oid of ['2.5.29.15', '2.5.29.19', '2.5.29.37', '2.5.29.9']) expect(Buffer.from(ext(ours12, oid)!.value).toString('hex'), oid).toBe(Buffer.from(ext(theirs12, oid)!.value).toString('hex'));
    expect(Buffer.from(ext(ours12, '2.5.29.9')!.value).toString('hex')).toBe('3018301606056781050210310d300b0c03312e32020102020174');
  });

  it('differs in the signature hash (SHA-256, not SHA-1) and the SAN values the TPM reports', () => {
    expect(theirs12.signatureAlgorithm).toMatchObject({ name: 'RSASSA-PKCS1-v1_5', hash: { name: 'SHA-1' } });
    expect(ours12.signatureAlgorithm).toMatchObject({ name: 'RSASSA-PKCS1-v1_5', hash: { name: 'SHA-256' } });
    const text = (c: x509.X509Certificate) => execFileSync('openssl', ['x509', '-noout', '-ext', 'subjectAltName'], { input: c.toString('pem'), encoding: 'utf8' });
    expect(text(theirs12)).toContain('DirName:/2.23.133.2.1=id:00001014/2.23.133.2.2=swtpm/2.23.133.2.3=id:00740001');
    expect(text(ours12)).toContain('DirName:/2.23.133.2.1=id:49424D00/2.23.133.2.2=swtpm/2.23.133.2.3=id:0000129E');
  });

  it('is stored as swtpm_cert --add-header stores it: 10 01 | 00 | certSize = DER + 2 | 10 02 | DER', () => {
    const der = Buffer.from(ours12.rawData);
    expect(stored.subarray(0, 7).toString('hex')).toBe(`100100${(der.length + 2).toString(16).padStart(4, '0')}1002`);
    expect(stored.subarray(7).equals(der)).toBe(true);
    // swtpm_setup's own TPM state holds its certificate in exactly this form.
    const theirsDer = Buffer.from(theirs12.rawData);
    expect(fs.readFileSync(join(w12, 'tpm', 'tpm-00.permall')).includes(Buffer.from(storedCert(theirsDer)))).toBe(true);
  });
});
