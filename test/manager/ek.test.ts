// Manufacture at the manager (`vtpm manager` as a process): the first OPEN of a TPM 2.0 VM makes its
// permanent state, once; the 25-byte OPEN chooses the EK certificates; a certificate too large for its
// NV index refuses the OPEN and leaves no VM behind; a bad --ca stops the manager naming the file.
import { afterEach, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { ManagerClient } from '../../src/manager/client.js';
import { Status, decodeOpen, encodeOpen } from '../../src/manager/wire.js';
import { CA_CHAIN_FILE } from '../../src/manager/ca.js';
import { CLI, startManager, type RunningManager } from './helpers.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const VM1 = '0e6b1c3a-5d7e-4f80-9a1b-2c3d4e5f6a71';
const VM2 = '0e6b1c3a-5d7e-4f80-9a1b-2c3d4e5f6a72';
const VM3 = '0e6b1c3a-5d7e-4f80-9a1b-2c3d4e5f6a73';
const VM4 = '0e6b1c3a-5d7e-4f80-9a1b-2c3d4e5f6a74';
const running: RunningManager[] = [];
const clients: ManagerClient[] = [];
const dirs: string[] = [];
const dir = (tag: string): string => {
  const d = tempDir(tag);
  dirs.push(d);
  return d;
};
afterEach(async () => {
  for (const c of clients.splice(0)) c.disconnect();
  for (const m of running.splice(0)) await m.stop('SIGKILL');
  for (const d of dirs.splice(0)) removeDir(d);
});

async function manager(state: string, run: string, extra: string[] = []): Promise<RunningManager> {
  const m = await startManager(state, run, extra);
  running.push(m);
  return m;
}

async function client(m: RunningManager): Promise<ManagerClient> {
  const c = await ManagerClient.connect(m.runDir, { privileged: true });
  clients.push(c);
  return c;
}

describe('OPEN with an EK choice on the wire', () => {
  it('appends one byte to our 24-byte OPEN (1 rsa, 2 ecc, 3 both, 4 none); 24 bytes still mean "the manager\'s default"', () => {
    const base = { migType: 1, startup: 1, vmType: 1, instance: 0, vmUuid: VM1, version: '2.0' as const };
    const b = encodeOpen({ ...base, ek: 'ecc' });
    expect(b.toString('hex')).toBe('01' + '01' + '01' + '00000000' + VM1.replace(/-/g, '') + '02' + '02');
    expect(decodeOpen(b)).toEqual({ ...base, ek: 'ecc' });
    expect(encodeOpen(base).length).toBe(24);
    expect(decodeOpen(encodeOpen(base))).toEqual(base);
    const bad = Buffer.from(b);
    bad[24] = 9;
    expect(() => decodeOpen(bad)).toThrow('unknown EK certificate code 9 (1 rsa, 2 ecc, 3 both, 4 none)');
  });
});

describe('manufacture at the first OPEN', () => {
  it('makes the permanent state before answering, once: a later OPEN, also after a restart, never makes it again', async () => {
    const state = dir('state');
    const run = dir('run');
    let m = await manager(state, run);
    let c = await client(m);
    const { instance, created } = await c.open({ vmUuid: VM1, version: '2.0' });
    expect(created).toBe(true);
    const line = await m.waitLog(new RegExp(`manufactured instance ${instance} for vm ${VM1}: rsa EK certificate \\(\\d+ bytes\\), ecc EK certificate \\(\\d+ bytes\\)`));
    expect(line).toBeTruthy();
    const perm = await c.load(instance, 'permanent');
    expect(perm?.length).toBeGreaterThan(1000);
    expect(fs.readFileSync(join(run, CA_CHAIN_FILE), 'utf8').match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
    await c.close(instance);
    expect(await c.open({ vmUuid: VM1, version: '2.0', ek: 'rsa' })).toEqual({ instance, created: false });
    c.disconnect();
    await m.stop();
    m = await manager(state, run);
    c = await client(m);
    expect(await c.open({ vmUuid: VM1, version: '2.0' })).toEqual({ instance, created: false });
    expect(Buffer.from((await c.load(instance, 'permanent'))!).equals(Buffer.from(perm!))).toBe(true);
    expect(m.log.filter((l) => l.includes('manufactured'))).toEqual([]);
    expect(m.log.some((l) => l.includes('loaded EK CA'))).toBe(true);
  });

  it('makes only the certificates asked for; none leaves manufacture to the first power-on; a TPM 1.2 gets its RSA EK certificate', async () => {
    const m = await manager(dir('state'), dir('run'));
    const c = await client(m);
    const a = await c.open({ vmUuid: VM1, version: '2.0', ek: 'rsa' });
    await m.waitLog(new RegExp(`manufactured instance ${a.instance} for vm ${VM1}: rsa EK certificate \\(\\d+ bytes\\), platform certificate \\(\\d+ bytes\\) in`));
    const b = await c.open({ vmUuid: VM2, version: '2.0', ek: 'none' });
    expect(await c.load(b.instance, 'permanent')).toBeNull();
    // The choice sticks: the backend's later OPEN (no choice) does not make certificates after all.
    expect(await c.open({ vmUuid: VM2, version: '2.0' })).toEqual({ instance: b.instance, created: false });
    expect(await c.load(b.instance, 'permanent')).toBeNull();
    // A TPM 1.2 gets its one (RSA) EK certified under the default; a choice without RSA leaves it as before.
    const d = await c.open({ vmUuid: VM3, version: '1.2' });
    await m.waitLog(new RegExp(`manufactured instance ${d.instance} for vm ${VM3}: rsa EK certificate \\(\\d+ bytes\\) in`));
    expect(await c.load(d.instance, 'permanent')).not.toBeNull();
    const e = await c.open({ vmUuid: VM4, version: '1.2', ek: 'ecc' });
    expect(await c.load(e.instance, 'permanent')).toBeNull();
    expect(m.log.filter((l) => l.includes('manufactured'))).toHaveLength(2);
  });

  it('refuses the OPEN when a certificate outgrows its NV index: no VM, no state left behind', async () => {
    const ca = dir('bigca');
    // A 2 KiB issuer name: every certificate it signs repeats it, and exceeds libtpms' 2048-byte NV index.
    const subj = '/CN=big CA' + Array.from({ length: 34 }, (_, i) => `/OU=${String(i).padStart(2, '0')}${'x'.repeat(60)}`).join('');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(ca, 'key.pem'), '-out', join(ca, 'cert.pem'), '-days', '30', '-subj', subj, '-addext', 'basicConstraints=critical,CA:TRUE'], { stdio: 'ignore' });
    const m = await manager(dir('state'), dir('run'), ['--ca', ca]);
    const c = await client(m);
    await expect(c.open({ vmUuid: VM1, version: '2.0' })).rejects.toMatchObject({ status: Status.FAIL });
    await m.waitLog(new RegExp(`OPEN on instance 0: manufacture of vm ${VM1} failed, its vTPM was not created: the rsa EK certificate is \\d{4} bytes; an NV index of this TPM holds at most 2048; answered TPM_FAIL`));
    // The VM is unknown: the next OPEN creates it (without certificates: nothing to store yet).
    const again = await c.open({ vmUuid: VM1, version: '2.0', ek: 'none' });
    expect(again.created).toBe(true);
    expect(await c.load(again.instance, 'permanent')).toBeNull();
  });

  it('does not start with a CA whose key is not its certificate\'s, naming the key file', () => {
    const a = dir('ca-a');
    const b = dir('ca-b');
    for (const d of [a, b]) execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(d, 'key.pem'), '-out', join(d, 'cert.pem'), '-days', '30', '-subj', '/CN=op', '-addext', 'basicConstraints=critical,CA:TRUE'], { stdio: 'ignore' });
    fs.copyFileSync(join(b, 'key.pem'), join(a, 'key.pem'));
    const r = spawnSync(process.execPath, [CLI, 'manager', '--state', dir('state'), '--run', dir('run'), '--ca', a], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`vtpm: CA key ${join(a, 'key.pem')} does not belong to the certificate in ${join(a, 'cert.pem')} (CN=op)`);
  });
});
