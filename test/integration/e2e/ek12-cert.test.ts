// The TPM 1.2 EK certificate with the real processes: a 1.2 guest of `vtpm host up` (its manager
// manufactures the TPM at the first OPEN), driven through its TCTI bridge with raw TPM 1.2 commands as
// an owner: TPM_ReadPubek, TPM_TakeOwnership, owner-authorised TPM_NV_ReadValue of 0x1000F000. The DER
// behind the stored-certificate header is accepted by `openssl verify` against `vtpm ca show` and
// certifies the EK the TPM reports; after host down + up, and migrated to a multi-VM host, the VM has
// the same certificate, never issued again; `--ek-profile ecc` is refused for a TPM 1.2 and `--no-ek-cert` leaves the index undefined.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { migrateVm, run, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { EK12_CERT_INDEX, parseStoredCert } from '../../../src/tpm/ek12.js';
import { responseCode } from '../../../src/tpm/wire.js';
import { TpmClient } from '../../helpers/tpm-client.js';
import { nvIndexSize, ownerNvReadAll, readPubek, takeOwnership, type Exec } from '../../helpers/tpm12-owner.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('e2e-ek12');
const A = { run: join(work, 'run'), state: join(work, 'state') };
const B = { run: join(work, 'b-run'), state: join(work, 'b-state') };
const chain = join(work, 'chain.pem');
const vm = randomUUID();
const clients: TpmClient[] = [];

beforeAll(async () => {
  await vtpm('host', 'up', '--run', A.run, '--state', A.state);
  await vtpm('ca', 'show', '--run', A.run, '--out', chain);
});

afterAll(async () => {
  for (const c of clients) c.close();
  for (const h of [A, B]) await vtpm('host', 'down', '--run', h.run).catch(() => {});
  removeDir(work);
});

/** A 1.2 guest on `port`, started (TPM_Startup(ST_CLEAR); 0x26 = started already). */
async function guest(domid: number, id: string, ...flags: string[]): Promise<Exec> {
  return guestOn(A.run, domid, id, ...flags);
}

async function guestOn(runDir: string, domid: number, id: string, ...flags: string[]): Promise<Exec> {
  const port = await freePortPair();
  await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', id, '--tpm-version', '1.2', '--tcti-port', String(port), ...flags);
  const c = await TpmClient.connect({ port });
  clients.push(c);
  const exec: Exec = { execute: (cmd) => c.transmit(cmd) };
  const rc = responseCode(await exec.execute(Uint8Array.from(Buffer.from('00c10000000c000000990001', 'hex'))));
  expect([0, 0x26]).toContain(rc);
  return exec;
}

async function readCert(tpm: Exec): Promise<Buffer> {
  const { size } = await nvIndexSize(tpm, EK12_CERT_INDEX);
  return Buffer.from(parseStoredCert(await ownerNvReadAll(tpm, EK12_CERT_INDEX, size)));
}

describe('TPM 1.2 EK certificate seen by a guest', () => {
  let der: Buffer;

  it('the owner reads 0x1000F000: a certificate of the EK the TPM reports, verified by the host CA chain', async () => {
    const tpm = await guest(1, vm);
    const pubek = await readPubek(tpm);
    await takeOwnership(tpm, pubek);
    der = await readCert(tpm);
    fs.writeFileSync(join(work, 'ek12.der'), der);
    await run('openssl', ['x509', '-inform', 'der', '-in', join(work, 'ek12.der'), '-out', join(work, 'ek12.pem')]);
    expect((await run('openssl', ['verify', '-CAfile', chain, join(work, 'ek12.pem')])).stdout.trim()).toMatch(/: OK$/);
    const modulus = (await run('openssl', ['x509', '-in', join(work, 'ek12.pem'), '-noout', '-modulus'])).stdout.trim();
    expect(modulus).toBe(`Modulus=${pubek.toString('hex').toUpperCase()}`);
    const text = (await run('openssl', ['x509', '-in', join(work, 'ek12.pem'), '-noout', '-subject', '-ext', 'subjectAltName,extendedKeyUsage'])).stdout;
    expect(text).toContain('subject=\n');
    expect(text).toContain('DirName:/2.23.133.2.1=id:49424D00/2.23.133.2.2=swtpm/2.23.133.2.3=id:0000129E');
    expect(text).toContain('2.23.133.8.1');
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '1');
  });

  it('keeps the same certificate across host down + up, never issuing it again', async () => {
    await vtpm('host', 'down', '--run', A.run);
    await vtpm('host', 'up', '--run', A.run, '--state', A.state);
    const tpm = await guest(1, vm);
    expect((await readCert(tpm)).equals(der)).toBe(true);
    const log = fs.readFileSync(join(A.run, 'logs', 'manager.log'), 'utf8');
    expect(log.match(/manufactured instance \d+ for vm \S+: rsa EK certificate \(\d+ bytes\)/g)).toEqual([expect.stringContaining(`for vm ${vm}: rsa EK certificate (${der.length} bytes)`)]);
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '1');
  });

  it('migrates with the VM to a multi-VM host: the same certificate there, made nowhere else', async () => {
    await vtpm('host', 'up', '--run', B.run, '--state', B.state, '--mode', 'multi');
    await migrateVm(A.run, B.run, vm, work);
    const tpm = await guestOn(B.run, 7, vm);
    expect((await readCert(tpm)).equals(der)).toBe(true);
    expect(fs.readFileSync(join(B.run, 'logs', 'manager.log'), 'utf8')).not.toMatch(/manufactured instance/);
    await vtpm('guest', 'detach', '--run', B.run, '--domid', '7');
  });

  it('--no-ek-cert leaves a 1.2 TPM without the index; --ek-profile ecc is a usage error for it', async () => {
    const tpm = await guest(2, randomUUID(), '--no-ek-cert');
    // TPM_GetCapability(TPM_CAP_NV_INDEX) of an index that does not exist: TPM_BADINDEX (0x2).
    await expect(nvIndexSize(tpm, EK12_CERT_INDEX)).rejects.toThrow(/rc 0x2$/);
    await vtpm('guest', 'detach', '--run', A.run, '--domid', '2');
    const bad = await vtpm('guest', 'attach', '--run', A.run, '--domid', '3', '--vm', randomUUID(), '--tpm-version', '1.2', '--ek-profile', 'ecc').catch((e: { code: number; stderr: string }) => e);
    expect(bad).toMatchObject({ code: 2, stderr: 'vtpm: --ek-profile ecc: a TPM 1.2 has one EK, an RSA key (--ek-profile rsa)\n' });
  });
});
