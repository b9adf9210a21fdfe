// A QEMU guest booted for real (Debian's kernel, busybox initramfs, TCG) on `vtpm qemu attach` reads its
// TPM's EK certificates through /dev/tpm0 with raw TPM2_NV_ReadPublic + TPM2_NV_Read and prints them
// hex on the console: they are the certificates the manager issued at manufacture (the same DER that
// tpm2_nvread finds for that VM through a TCTI bridge afterwards), and `openssl verify` accepts them
// against `vtpm ca show`.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { freePortPair } from '../../../src/cli/ports.js';
import { run, tcti } from '../../helpers/host.js';
import { Qemu, TestHost, buildInitramfs, vtpm } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qemu-ek');
let host: TestHost;
let initrd: string;
const qemus: Qemu[] = [];

beforeAll(async () => {
  [host, initrd] = await Promise.all([TestHost.up(work), buildInitramfs(work)]);
});

afterAll(async () => {
  await Promise.all(qemus.map((q) => q.quit()));
  await host?.down();
  removeDir(work);
});

async function verify(der: Buffer, name: string, chain: string): Promise<string> {
  fs.writeFileSync(join(work, `${name}.der`), der);
  await run('openssl', ['x509', '-inform', 'der', '-in', join(work, `${name}.der`), '-out', join(work, `${name}.pem`)]);
  return (await run('openssl', ['verify', '-CAfile', chain, join(work, `${name}.pem`)])).stdout.trim();
}

describe('a booted QEMU guest reads its EK certificates', () => {
  it('through /dev/tpm0: the DER the manager issued for its VM, verified by the host CA chain', async () => {
    const vm = randomUUID();
    const ctrl = join(work, 'ek.sock');
    await host.attach(vm, ctrl);
    // loglevel=1: no kernel message may land in the middle of a certificate's line on the console.
    const q = new Qemu({ name: 'ek', dir: work, initrd, ctrl, device: 'tpm-crb', append: 'e2e_ekcert loglevel=1' });
    qemus.push(q);
    const rsaLine = (await q.waitSerial(/^E2E-EKCERT-RSA (\S*)/m))[1]!;
    const eccLine = (await q.waitSerial(/^E2E-EKCERT-ECC (\S*)/m))[1]!;
    expect(rsaLine).toMatch(/^30820[0-9a-f]+$/);
    expect(eccLine).toMatch(/^30820[0-9a-f]+$/);
    const rsa = Buffer.from(rsaLine, 'hex');
    const ecc = Buffer.from(eccLine, 'hex');
    // More than one NV_Read of 768 bytes: the guest's offsets were followed.
    expect(rsa.length).toBeGreaterThan(768);

    const chain = join(work, 'chain.pem');
    await vtpm('ca', 'show', '--run', host.run, '--out', chain);
    expect(await verify(rsa, 'rsa', chain)).toMatch(/: OK$/);
    expect(await verify(ecc, 'ecc', chain)).toMatch(/: OK$/);
    const subject = (await run('openssl', ['x509', '-in', join(work, 'rsa.pem'), '-noout', '-subject'])).stdout.trim();
    expect(subject).toBe(`subject=CN = ${vm}`);
    await q.quit();
    await host.detach(vm);

    // The same VM through a TCTI bridge: tpm2_nvread finds byte for byte what the guest printed, and the
    // manager manufactured the VM once (at `qemu attach`), with these two certificates.
    const port = await freePortPair();
    await vtpm('guest', 'attach', '--run', host.run, '--domid', '1', '--vm', vm, '--tcti-port', String(port));
    try {
      for (const [index, der, name] of [['0x01c00002', rsa, 'rsa'], ['0x01c0000a', ecc, 'ecc']] as const) {
        await run('tpm2_nvread', [index, '-o', join(work, `tools-${name}.der`)], { env: tcti(port) });
        expect(fs.readFileSync(join(work, `tools-${name}.der`)).equals(der)).toBe(true);
      }
    } finally {
      await vtpm('guest', 'detach', '--run', host.run, '--domid', '1');
    }
    const made = fs.readFileSync(join(host.run, 'logs', 'manager.log'), 'utf8').match(/manufactured instance \d+ for vm (\S+): rsa EK certificate \((\d+) bytes\), ecc EK certificate \((\d+) bytes\)/g) ?? [];
    expect(made).toEqual([expect.stringContaining(`for vm ${vm}: rsa EK certificate (${rsa.length} bytes), ecc EK certificate (${ecc.length} bytes)`)]);
  });
});
