// A TCG platform certificate (an X.509 attribute certificate) checked from outside the library that
// made it: `openssl asn1parse` finds its three top-level parts, `openssl dgst -verify` checks the
// signature over the DER of its AttributeCertificateInfo with the issuing CA's public key; its fields
// are read back with @peculiar/asn1-x509-attr.
import 'reflect-metadata';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { AsnConvert } from '@peculiar/asn1-schema';
import { Name as AsnName, SubjectAlternativeName } from '@peculiar/asn1-x509';
import { AttributeCertificate } from '@peculiar/asn1-x509-attr';

export interface PlatformCertView {
  /** openssl's verdict on the signature ("Verified OK"). */
  signature: string;
  holderIssuer: string;
  holderSerial: string;
  issuer: string;
  san: string;
  attributes: string[];
  notAfter: string;
}

/** `issuerPem`: the issuing CA certificate (the first in `vtpm ca show`). */
export function checkPlatformCert(der: Uint8Array, issuerPem: string, dir: string): PlatformCertView {
  const file = join(dir, 'platform.der');
  fs.writeFileSync(file, der);
  const top = execFileSync('openssl', ['asn1parse', '-inform', 'der', '-in', file], { encoding: 'utf8' })
    .split('\n')
    .filter((l) => /d=1 /.test(l))
    .map((l) => l.match(/^\s*(\d+):d=1\s+hl=(\d+)\s+l=\s*(\d+)\s+(prim|cons):\s+(\S+)/)!)
    .map((m) => ({ off: Number(m[1]), hl: Number(m[2]), len: Number(m[3]), type: m[5]! }));
  if (top.length !== 3 || top[0]!.type !== 'SEQUENCE' || top[1]!.type !== 'SEQUENCE' || top[2]!.type !== 'BIT') throw new Error(`not a signed structure: ${JSON.stringify(top)}`);
  const [tbs, , sig] = top as [(typeof top)[0], (typeof top)[0], (typeof top)[0]];
  fs.writeFileSync(join(dir, 'tbs.der'), Buffer.from(der).subarray(tbs.off, tbs.off + tbs.hl + tbs.len));
  // The BIT STRING's first content byte is its count of unused bits (0).
  fs.writeFileSync(join(dir, 'sig.bin'), Buffer.from(der).subarray(sig.off + sig.hl + 1, sig.off + sig.hl + sig.len));
  fs.writeFileSync(join(dir, 'issuer.pem'), issuerPem);
  const pub = execFileSync('openssl', ['x509', '-in', join(dir, 'issuer.pem'), '-noout', '-pubkey'], { encoding: 'utf8' });
  fs.writeFileSync(join(dir, 'issuer.pub'), pub);
  const signature = execFileSync('openssl', ['dgst', '-sha256', '-verify', join(dir, 'issuer.pub'), '-signature', join(dir, 'sig.bin'), join(dir, 'tbs.der')], { encoding: 'utf8' }).trim();

  const ac = AsnConvert.parse(der, AttributeCertificate).acinfo;
  const dn = (n: AsnName): string => new x509.Name(AsnConvert.serialize(n)).toString();
  const base = ac.holder.baseCertificateID!;
  const sanExt = ac.extensions!.find((e) => e.extnID === '2.5.29.17')!;
  const san = AsnConvert.parse(sanExt.extnValue.buffer, SubjectAlternativeName);
  return {
    signature,
    holderIssuer: dn(base.issuer[0]!.directoryName!),
    holderSerial: Buffer.from(base.serial).toString('hex'),
    issuer: dn(ac.issuer.v2Form!.issuerName![0]!.directoryName!),
    san: dn(san[0]!.directoryName!),
    attributes: ac.attributes.map((a) => `${a.type}=${Buffer.from(a.values[0]!).toString('hex')}`),
    notAfter: ac.attrCertValidityPeriod.notAfterTime.toISOString(),
  };
}
