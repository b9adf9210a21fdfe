// EK certificates with the real tools: `vtpm host up` (its manager makes the host CA), guests running
// tpm2-tools through their TCTI bridge read 0x01C00002 / 0x01C0000A and the platform certificate at
// 0x01C08000, `openssl verify` (and `openssl dgst -verify` for the platform certificate) accepts them
// against `vtpm ca show`, `tpm2_createek` derives the certified keys, the owner cannot overwrite them;
// they survive host down + up and a migration to a multi-VM host, a QEMU-style client of `qemu attach`
// reads the same, and `host up --ca` with a key that is not the certificate's is refused naming it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { migrateVm, run, tcti as tools, until, vtpm } from '../../helpers/host.js';
import { checkPlatformCert } from '../../helpers/attr-cert.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { nvRead, parseNvRead } from '../../../src/tpm/tpm2-commands.js';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import { CtrlClient, DataClient, TPM2 } from '../qemu/helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('e2e-ek');
const A = { run: join(work, 'a-run'), state: join(work, 'a-state') };
const B = { run: join(work, 'b-run'), state: join(work, 'b-state') };
const chain = join(work, 'chain.pem');
const vm = randomUUID();
let port = 0;

beforeAll(async () => {
  await vtpm('host', 'up', '--run', A.run, '--state', A.state);
  await vtpm('ca', 'show', '--run', A.run, '--out', chain);
});

afterAll(async () => {
  for (const h of [A, B]) await vtpm('host', 'down', '--run', h.run).catch(() => {});
  removeDir(work);
});

/** tpm2_nvread of an index into a file; null when the index does not exist. */
async function nvread(p: number, index: string, out: string): Promise<Buffer | null> {
  try {
    await run('tpm2_nvread', [index, '-o', out], { env: tools(p) });
  } catch (err) {
    if (/0x18b|handle/i.test((err as { stderr?: string }).stderr ?? '')) return null;
    throw err;
  }
  return fs.readFileSync(out);
}

async function verify(der: Buffer, name: string): Promise<string> {
  const pem = join(work, `${name}.pem`);
  fs.writeFileSync(join(work, `${name}.der`), der);
  await run('openssl', ['x509', '-inform', 'der', '-in', join(work, `${name}.der`), '-out', pem]);
  return (await run('openssl', ['verify', '-CAfile', chain, pem])).stdout.trim();
}

describe('EK certificates seen by a guest with tpm2-tools', () => {
  let rsa: Buffer;
  let ecc: Buffer;

  it('reads both certificates from their TCG indices; openssl verifies them against `vtpm ca show`', async () => {
    port = await freePortPair();
    await vtpm('guest', 'attach', '--run', A.run, '--domid', '1', '--vm', vm, '--tcti-port', String(port));
    rsa = (await nvread(port, '0x01c00002', join(work, 'rsa.der')))!;
    ecc = (await nvread(port, '0x01c0000a', join(work, 'ecc.der')))!;
    expect(await verify(rsa, 'rsa')).toMatch(/: OK$/);
    expect(await verify(ecc, 'ecc')).toMatch(/: OK$/);
    // tpm2_getekcertificate, what enrolment scripts call, finds both where it looks on hardware.
    await run('tpm2_getekcertificate', ['-o', join(work, 'get-rsa.der'), '-o', join(work, 'get-ecc.der')], { env: tools(port) });
    expect(fs.readFileSync(join(work, 'get-rsa.der')).equals(rsa)).toBe(true);
    expect(fs.readFileSync(join(work, 'get-ecc.der')).equals(ecc)).toBe(true);
    const text = (await run('openssl', ['x509', '-in', join(work, 'rsa.pem'), '-noout', '-subject'])).stdout;
    expect(text.trim()).toBe(`subject=CN = ${vm}`);
    // The platform certificate at 0x01C08000: held by the RSA EK certificate, signed by the issuing CA.
    const platform = (await nvread(port, '0x01c08000', join(work, 'platform.der')))!;
    const issuerPem = fs.readFileSync(chain, 'utf8').match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/)![0];
    const v = checkPlatformCert(platform, issuerPem, fs.mkdtempSync(join(work, 'pc-')));
    expect(v.signature).toBe('Verified OK');
    expect(v.holderSerial).toBe(new x509.X509Certificate(new Uint8Array(rsa)).serialNumber.toLowerCase());
    expect(v.san).toBe('2.23.133.5.1.1=vtpm-split, 2.23.133.5.1.4=vtpm-split, 2.23.133.5.1.5=1');
  });

  it("certifies the key tpm2_createek derives (RSA and ECC), and the indices' attributes are a manufacturer's", async () => {
    for (const [alg, name] of [['rsa', 'rsa'], ['ecc', 'ecc']] as const) {
      const pub = join(work, `createek-${alg}.pem`);
      await run('tpm2_createek', ['-G', alg, '-c', join(work, `ek-${alg}.ctx`), '-u', pub, '-f', 'pem'], { env: tools(port) });
      await run('tpm2_flushcontext', ['-t'], { env: tools(port) });
      const certPub = (await run('openssl', ['x509', '-in', join(work, `${name}.pem`), '-noout', '-pubkey'])).stdout;
      expect(certPub).toBe(fs.readFileSync(pub, 'utf8'));
    }
    const rp = (await run('tpm2_nvreadpublic', ['0x01c00002'], { env: tools(port) })).stdout;
    expect(rp).toContain('friendly: ppwrite|writelocked|writedefine|ppread|ownerread|authread|no_da|written|platformcreate');
    expect(rp).toContain(`size: ${rsa.length}`);
  });

  it('cannot be overwritten or removed by the owner', async () => {
    const junk = join(work, 'junk');
    fs.writeFileSync(junk, 'overwrite');
    const w = await run('tpm2_nvwrite', ['0x01c00002', '-C', 'o', '-i', junk], { env: tools(port) }).catch((e: { stderr: string }) => e);
    expect((w as { stderr: string }).stderr).toMatch(/NV access locked|0x148/);
    const u = await run('tpm2_nvundefine', ['0x01c00002', '-C', 'o'], { env: tools(port) }).catch((e: { stderr: string }) => e);
    expect((u as { stderr: string }).stderr).toMatch(/0x149|authorization/);
    expect((await nvread(port, '0x01c00002', join(work, 'again.der')))!.equals(rsa)).toBe(true);
  });

  it('keeps the same certificates across host down + host up, never issuing again', async () => {
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '1');
    await vtpm('host', 'down', '--run', A.run);
    await vtpm('host', 'up', '--run', A.run, '--state', A.state);
    // Asking for other certificates on a later attach changes nothing, and says so.
    const again = await vtpm('guest', 'attach', '--run', A.run, '--domid', '1', '--vm', vm, '--tcti-port', String(port), '--ek-profile', 'rsa');
    expect(again.stderr).toBe(`vtpm: VM ${vm} exists; its TPM keeps the EK certificates it was made with (--ek-profile/--no-ek-cert apply to new VMs)\n`);
    expect((await nvread(port, '0x01c00002', join(work, 'r2.der')))!.equals(rsa)).toBe(true);
    expect((await nvread(port, '0x01c0000a', join(work, 'e2.der')))!.equals(ecc)).toBe(true);
    expect(fs.readFileSync(join(A.run, 'logs', 'manager.log'), 'utf8').match(/manufactured instance/g)).toHaveLength(1);
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '1');
  });

  it('--ek-profile rsa makes only the RSA certificate, --no-ek-cert none', async () => {
    const p2 = await freePortPair();
    await vtpm('guest', 'attach', '--run', A.run, '--domid', '2', '--vm', randomUUID(), '--tcti-port', String(p2), '--ek-profile', 'rsa');
    expect(await nvread(p2, '0x01c00002', join(work, 'p-rsa.der'))).not.toBeNull();
    expect(await nvread(p2, '0x01c0000a', join(work, 'p-ecc.der'))).toBeNull();
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '2');
    await vtpm('guest', 'attach', '--run', A.run, '--domid', '3', '--vm', randomUUID(), '--tcti-port', String(p2), '--no-ek-cert');
    expect(await nvread(p2, '0x01c00002', join(work, 'n-rsa.der'))).toBeNull();
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '3');
    const bad = await vtpm('guest', 'attach', '--run', A.run, '--domid', '4', '--vm', randomUUID(), '--ek-profile', 'rsa', '--no-ek-cert').catch((e: { stderr: string; code: number }) => e);
    expect(bad).toMatchObject({ code: 2, stderr: 'vtpm: --ek-profile and --no-ek-cert contradict each other: give one\n' });
  });

  it('a QEMU-style client of `qemu attach` reads the same certificate over the data channel; --ek-profile works there too', async () => {
    const ctrl = join(work, 'q.sock');
    await vtpm('qemu', 'attach', '--run', A.run, '--vm', vm, '--ctrl', ctrl);
    const c = await CtrlClient.connect(ctrl);
    const [mine, theirs] = socketPair();
    sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]); // SET_DATAFD
    closeFd(theirs);
    expect((await c.read(4)).toString('hex')).toBe('00000000');
    const d = new DataClient(mine);
    expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // CMD_INIT
    expect(await d.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    let got = Buffer.alloc(0);
    for (let off = 0; off < rsa.length; off += 1024) {
      const r = Buffer.from(await d.transmit(Buffer.from(nvRead(0x01c00002, Math.min(1024, rsa.length - off), off)).toString('hex')), 'hex');
      got = Buffer.concat([got, parseNvRead(r)]);
    }
    expect(got.equals(rsa)).toBe(true);
    d.close();
    c.close();
    await vtpm('qemu', 'detach', '--run', A.run, '--vm', vm);

    // `qemu attach --ek-profile ecc` for a new VM: only the ECC index exists (NV_ReadPublic: 0x18b = no such handle).
    const vm2 = randomUUID();
    const ctrl2 = join(work, 'q2.sock');
    await vtpm('qemu', 'attach', '--run', A.run, '--vm', vm2, '--ctrl', ctrl2, '--ek-profile', 'ecc');
    const c2 = await CtrlClient.connect(ctrl2);
    const [mine2, theirs2] = socketPair();
    sendWithFds(c2.fd, Buffer.from('00000010', 'hex'), [theirs2]);
    closeFd(theirs2);
    expect((await c2.read(4)).toString('hex')).toBe('00000000');
    const d2 = new DataClient(mine2);
    expect(await c2.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await d2.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    expect((await d2.transmit('8001 0000000e 00000169 01c00002')).slice(12, 20)).toBe('0000018b');
    expect((await d2.transmit('8001 0000000e 00000169 01c0000a')).slice(12, 20)).toBe('00000000');
    d2.close();
    c2.close();
    await vtpm('qemu', 'detach', '--run', A.run, '--vm', vm2);
  });

  it('migrates with the VM to a multi-VM host: the same certificate there, still verified by the source CA', async () => {
    await vtpm('host', 'up', '--run', B.run, '--state', B.state, '--mode', 'multi');
    await migrateVm(A.run, B.run, vm, work);
    const pb = await freePortPair();
    await vtpm('guest', 'attach', '--run', B.run, '--domid', '7', '--vm', vm, '--tcti-port', String(pb));
    expect((await nvread(pb, '0x01c00002', join(work, 'b-rsa.der')))!.equals(rsa)).toBe(true);
    expect((await nvread(pb, '0x01c0000a', join(work, 'b-ecc.der')))!.equals(ecc)).toBe(true);
    expect(fs.readFileSync(join(B.run, 'logs', 'manager.log'), 'utf8')).not.toMatch(/manufactured instance/);
    // A new VM on the multi-VM host gets certificates from B's own CA.
    const fresh = await freePortPair();
    await vtpm('guest', 'attach', '--run', B.run, '--domid', '8', '--vm', randomUUID(), '--tcti-port', String(fresh));
    const bChain = join(work, 'b-chain.pem');
    await vtpm('ca', 'show', '--run', B.run, '--out', bChain);
    const der = (await nvread(fresh, '0x01c00002', join(work, 'b-new.der')))!;
    fs.writeFileSync(join(work, 'b-new.pem'), (await run('openssl', ['x509', '-inform', 'der', '-in', join(work, 'b-new.der')])).stdout);
    expect((await run('openssl', ['verify', '-CAfile', bChain, join(work, 'b-new.pem')])).stdout.trim()).toMatch(/: OK$/);
    expect(der.length).toBeGreaterThan(500);
  });
});

describe('host up --ca and --ek-certs', () => {
  it('a certificate too large for its NV index: guest attach fails saying so, and the VM is not created', async () => {
    const ca = join(work, 'bigca');
    fs.mkdirSync(ca);
    const subj = '/CN=big CA' + Array.from({ length: 34 }, (_, i) => `/OU=${String(i).padStart(2, '0')}${'x'.repeat(60)}`).join('');
    await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(ca, 'key.pem'), '-out', join(ca, 'cert.pem'), '-days', '30', '-subj', subj, '-addext', 'basicConstraints=critical,CA:TRUE']);
    const D = { run: join(work, 'd-run'), state: join(work, 'd-state') };
    await vtpm('host', 'up', '--run', D.run, '--state', D.state, '--ca', ca);
    try {
      const big = randomUUID();
      const r = await vtpm('guest', 'attach', '--run', D.run, '--domid', '1', '--vm', big, '--ek-profile', 'rsa').catch((e: { code: number; stderr: string }) => e);
      expect((r as { code: number }).code).toBe(1);
      expect((r as { stderr: string }).stderr).toMatch(/the rsa EK certificate is \d{4} bytes; an NV index of this TPM holds at most 2048/);
      // Nothing was made: the same VM attaches afterwards, manufactured as asked then.
      const p = await freePortPair();
      await vtpm('guest', 'attach', '--run', D.run, '--domid', '1', '--vm', big, '--no-ek-cert', '--tcti-port', String(p));
      expect(await nvread(p, '0x01c00002', join(work, 'd.der'))).toBeNull();
    } finally {
      await vtpm('host', 'down', '--run', D.run).catch(() => {});
    }
  });


  it('host up --platform-* names the platform in new TPMs\' platform certificates, also after the manager is restarted', async () => {
    const P = { run: join(work, 'p-run'), state: join(work, 'p-state') };
    await vtpm('host', 'up', '--run', P.run, '--state', P.state, '--platform-manufacturer', 'ACME Corp', '--platform-model', 'Anvil', '--platform-version', '9.1');
    try {
      const pChain = join(work, 'p-chain.pem');
      await vtpm('ca', 'show', '--run', P.run, '--out', pChain);
      const issuerPem = fs.readFileSync(pChain, 'utf8').match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/)![0];
      const sans: string[] = [];
      for (const domid of [1, 2]) {
        const p = await freePortPair();
        await vtpm('guest', 'attach', '--run', P.run, '--domid', String(domid), '--vm', randomUUID(), '--tcti-port', String(p));
        const v = checkPlatformCert((await nvread(p, '0x01c08000', join(work, `p${domid}.der`)))!, issuerPem, fs.mkdtempSync(join(work, 'pc-')));
        expect(v.signature).toBe('Verified OK');
        sans.push(v.san);
        await vtpm('guest', 'detach', '--run', P.run, '--domid', String(domid));
        if (domid === 1) {
          // The manager dies; `host up` restarts it with the flags the host was started with.
          const h = JSON.parse(fs.readFileSync(join(P.run, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
          const pid = h.processes.find((x) => x.role === 'manager')!.pid;
          process.kill(pid, 'SIGKILL');
          await until(async () => { try { process.kill(pid, 0); return undefined; } catch { return true; } }, 'the manager to die');
          await vtpm('host', 'up', '--run', P.run, '--state', P.state);
        }
      }
      expect(sans).toEqual(Array(2).fill('2.23.133.5.1.1=ACME Corp, 2.23.133.5.1.4=Anvil, 2.23.133.5.1.5=9.1'));
    } finally {
      await vtpm('host', 'down', '--run', P.run).catch(() => {});
    }
  });

  it('host up --ek-certs sets what an attach without a choice gets (none here); a bad value is a usage error', async () => {
    const bad = await vtpm('host', 'up', '--run', join(work, 'e-run'), '--state', join(work, 'e-state'), '--ek-certs', 'dsa').catch((e: { code: number; stderr: string }) => e);
    expect(bad).toMatchObject({ code: 2, stderr: 'vtpm: --ek-certs must be rsa, ecc, both or none, not dsa\n' });
    const E = { run: join(work, 'e-run'), state: join(work, 'e-state') };
    await vtpm('host', 'up', '--run', E.run, '--state', E.state, '--ek-certs', 'none');
    try {
      const p = await freePortPair();
      await vtpm('guest', 'attach', '--run', E.run, '--domid', '1', '--vm', randomUUID(), '--tcti-port', String(p));
      expect(await nvread(p, '0x01c00002', join(work, 'e-rsa.der'))).toBeNull();
      expect(await nvread(p, '0x01c0000a', join(work, 'e-ecc.der'))).toBeNull();
    } finally {
      await vtpm('host', 'down', '--run', E.run).catch(() => {});
    }
  });

  it('refuses a CA whose key is not its certificate\'s, naming the file, before starting anything', async () => {
    const ca = join(work, 'opca');
    const other = join(work, 'other');
    for (const d of [ca, other]) {
      fs.mkdirSync(d);
      await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(d, 'key.pem'), '-out', join(d, 'cert.pem'), '-days', '30', '-subj', '/CN=op', '-addext', 'basicConstraints=critical,CA:TRUE']);
    }
    fs.copyFileSync(join(other, 'key.pem'), join(ca, 'key.pem'));
    const runDir = join(work, 'c-run');
    const r = await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'c-state'), '--ca', ca).catch((e: { code: number; stderr: string }) => e);
    expect(r).toMatchObject({ code: 2, stderr: `vtpm: --ca: CA key ${join(ca, 'key.pem')} does not belong to the certificate in ${join(ca, 'cert.pem')} (CN=op)\n` });
    expect(fs.existsSync(join(runDir, 'host.json'))).toBe(false);
  });
});
