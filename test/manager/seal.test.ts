import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { MASTER_KEY_FILE, Sealer, loadKeyFile, loadTpmSealedKey } from '../../src/manager/seal.js';
import { ManagerClient } from '../../src/manager/client.js';
import { CLI, refusal, startManager } from './helpers.js';
import { SwtpmProcess } from '../helpers/swtpm.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const A = '11111111-1111-4111-8111-111111111111';
const B = '22222222-2222-4222-8222-222222222222';

describe('blob sealing (AES-256-GCM, per-blob key from the instance key, bound AAD)', () => {
  const s = new Sealer(crypto.randomBytes(32));
  const ctx = { instance: 3, vmUuid: A, kind: 'permanent' as const, generation: 17 };
  const data = crypto.randomBytes(5000);
  const sealed = s.seal(ctx, data);

  it('opens what it sealed, and the ciphertext does not contain the plaintext', () => {
    expect(s.open(ctx, sealed)).toEqual(data);
    expect(sealed.includes(data.subarray(0, 32))).toBe(false);
  });

  it('refuses the blob for another instance, VM, or kind', () => {
    expect(refusal(() => s.open({ ...ctx, instance: 4 }, sealed))).toBe('WRONG_OWNER');
    expect(refusal(() => s.open({ ...ctx, vmUuid: B }, sealed))).toBe('WRONG_OWNER');
    expect(refusal(() => s.open({ ...ctx, kind: 'volatile' }, sealed))).toBe('WRONG_OWNER');
  });

  it('refuses an older generation (rollback)', () => {
    const older = s.seal({ ...ctx, generation: 16 }, data);
    expect(refusal(() => s.open(ctx, older))).toBe('ROLLBACK');
  });

  it('refuses a header rewritten to claim another owner: the tag covers it', () => {
    const other = s.seal({ ...ctx, instance: 9 }, data);
    const forged = Buffer.from(other);
    forged.writeUInt32BE(3, 10); // claim instance 3
    expect(refusal(() => s.open(ctx, forged))).toBe('TAMPERED');
  });

  it('refuses any flipped byte', () => {
    for (const at of [40, 60, sealed.length - 1]) {
      const t = Buffer.from(sealed);
      t[at]! ^= 0x01;
      expect(refusal(() => s.open(ctx, t))).toBe('TAMPERED');
    }
    expect(refusal(() => s.open(ctx, sealed.subarray(0, 20)))).toBe('BAD_FORMAT');
  });

  it('derives different keys per instance and per VM', () => {
    expect(s.instanceKey(1, A).equals(s.instanceKey(2, A))).toBe(false);
    expect(s.instanceKey(1, A).equals(s.instanceKey(1, B))).toBe(false);
  });

  // Issue #15 item 8: one instance key with random 96-bit IVs reaches the 2^32-message bound of AES-GCM.
  it('seals each blob under its own key (format 2): HKDF(instance key, 16-byte salt, "blob" | header), IV = generation', () => {
    const header = sealed.subarray(0, 38);
    expect(header).toEqual(
      Buffer.concat([Buffer.from('VTPMSEAL'), Buffer.from([2, 0]), Buffer.from('00000003', 'hex'), Buffer.from(A.replace(/-/g, ''), 'hex'), Buffer.from('0000000000000011', 'hex')]),
    );
    const salt = sealed.subarray(38, 54);
    const key = Buffer.from(crypto.hkdfSync('sha256', s.instanceKey(3, A), salt, Buffer.concat([Buffer.from('blob'), header]), 32));
    const d = crypto.createDecipheriv('aes-256-gcm', key, Buffer.from('000000000000000000000011', 'hex'));
    d.setAAD(header);
    d.setAuthTag(sealed.subarray(54, 70));
    expect(Buffer.concat([d.update(sealed.subarray(70)), d.final()])).toEqual(data);
    // The same context sealed again (a generation reused after a crash lost its commit): another key.
    const again = s.seal(ctx, data);
    expect(again.subarray(38, 54).equals(salt)).toBe(false);
    expect(s.open(ctx, again)).toEqual(data);
  });

  it('still opens format-1 blobs (one instance key, random IV) sealed before format 2', () => {
    const header = Buffer.from(sealed.subarray(0, 38));
    header[8] = 1;
    const iv = crypto.randomBytes(12);
    const c = crypto.createCipheriv('aes-256-gcm', s.instanceKey(3, A), iv);
    c.setAAD(header);
    const body = Buffer.concat([c.update(data), c.final()]);
    const v1 = Buffer.concat([header, iv, c.getAuthTag(), body]);
    expect(s.open(ctx, v1)).toEqual(data);
    const t = Buffer.from(v1);
    t[t.length - 1]! ^= 1;
    expect(refusal(() => s.open(ctx, t))).toBe('TAMPERED');
    expect(refusal(() => s.open({ ...ctx, generation: 18 }, v1))).toBe('ROLLBACK');
  });
});

describe('a state directory written before format 2 (fixtures/state-format1, made by the manager at 1acef50)', () => {
  it('loads its format-1 blobs in the real manager; the next save seals format 2 and both load after a restart', async () => {
    const stateDir = tempDir('state-f1');
    const runDir = tempDir('run-f1');
    const fixture = path.join(path.dirname(new URL(import.meta.url).pathname), 'fixtures', 'state-format1');
    for (const f of fs.readdirSync(fixture)) {
      fs.copyFileSync(path.join(fixture, f), path.join(stateDir, f));
      fs.chmodSync(path.join(stateDir, f), 0o600);
    }
    let m = await startManager(stateDir, runDir, ['--log-bytes', '4096']);
    let c: ManagerClient | null = null;
    try {
      c = await ManagerClient.connect(runDir);
      expect(fs.readFileSync(path.join(stateDir, 'i1.permanent.g1.blob'))[8]).toBe(1);
      expect(await c.open({ vmUuid: '0f0e0d0c-0b0a-4908-8706-050403020100', version: '2.0' })).toEqual({ instance: 1, created: false });
      expect(Buffer.from((await c.load(1, 'permanent'))!).toString()).toBe('permanent state sealed by format 1 (random IV under the instance key)');
      expect(Buffer.from((await c.load(1, 'volatile'))!).toString()).toBe('volatile state sealed by format 1');
      await c.store(1, 'volatile', Buffer.from('volatile state sealed by format 2'));
      c.disconnect();
      expect(await m.stop('SIGTERM')).toBe(0);
      const v = fs.readdirSync(stateDir).find((f) => f.startsWith('i1.volatile.'))!;
      expect(fs.readFileSync(path.join(stateDir, v))[8]).toBe(2);
      m = await startManager(stateDir, runDir, ['--log-bytes', '4096']);
      c = await ManagerClient.connect(runDir);
      expect(Buffer.from((await c.load(1, 'permanent'))!).toString()).toBe('permanent state sealed by format 1 (random IV under the instance key)');
      expect(Buffer.from((await c.load(1, 'volatile'))!).toString()).toBe('volatile state sealed by format 2');
    } finally {
      c?.disconnect();
      await m.stop('SIGKILL');
      for (const d of [stateDir, runDir]) removeDir(d);
    }
  });
});

describe('master key file', () => {
  it('is created 0600 at first start and read back after', () => {
    const d = tempDir('key');
    const a = loadKeyFile(d);
    expect(a.created).toBe(true);
    expect(fs.statSync(path.join(d, MASTER_KEY_FILE)).mode & 0o777).toBe(0o600);
    const b = loadKeyFile(d);
    expect(b.created).toBe(false);
    expect(b.key.equals(a.key)).toBe(true);
  });

  it('is refused when others can read it', () => {
    const d = tempDir('key');
    loadKeyFile(d);
    fs.chmodSync(path.join(d, MASTER_KEY_FILE), 0o644);
    expect(() => loadKeyFile(d)).toThrow(/must be 0600/);
  });
});

describe('master key sealed to PCRs of a host TPM (swtpm playing the host TPM)', () => {
  let swtpm: SwtpmProcess;
  let tcti: string;

  beforeAll(async () => {
    swtpm = await SwtpmProcess.start({ stateDir: tempDir('hosttpm'), transport: 'tcp', flags: 'not-need-init,startup-clear' });
    tcti = swtpm.tcti;
  });

  afterAll(async () => {
    await swtpm?.stop();
  });

  it('unseals the same key while the PCRs hold, and refuses once a PCR is extended', () => {
    const d = tempDir('sealed');
    const opts = { tcti, pcrs: 'sha256:0,7' };
    const a = loadTpmSealedKey(d, opts);
    expect(a.created).toBe(true);
    expect(fs.existsSync(path.join(d, MASTER_KEY_FILE))).toBe(false);
    const sealedPriv = fs.readFileSync(path.join(d, 'master.tpm.priv'));
    expect(sealedPriv.includes(a.key)).toBe(false);
    const b = loadTpmSealedKey(d, opts);
    expect(b.created).toBe(false);
    expect(b.key.equals(a.key)).toBe(true);
    execFileSync('tpm2_pcrextend', [`7:sha256=${'00'.repeat(31)}01`], { env: { ...process.env, TPM2TOOLS_TCTI: tcti }, stdio: 'pipe' });
    expect(() => loadTpmSealedKey(d, opts)).toThrow(/tpm2_unseal failed.*policy check failed/);
  });

  it('vtpm manager --seal-to-tpm keeps no key file, resumes with the PCRs unchanged, refuses to start after', async () => {
    const stateDir = tempDir('sealed-state');
    const runDir = tempDir('sealed-run');
    const uuid = '5ea1ed00-0000-4000-8000-000000000001';
    let m = await startManager(stateDir, runDir, ['--seal-to-tpm', tcti, '--seal-pcrs', 'sha256:1,2']);
    let c = await ManagerClient.connect(runDir);
    const { instance } = await c.open({ vmUuid: uuid, version: '2.0' });
    await c.store(instance, 'permanent', Buffer.from('sealed by the host TPM'));
    c.disconnect();
    expect(await m.stop()).toBe(0);
    expect(fs.readdirSync(stateDir)).not.toContain(MASTER_KEY_FILE);
    // The EK CA's keys are sealed with it: encrypted under the master key, no PEM on disk.
    expect(fs.readdirSync(path.join(stateDir, 'ca')).sort()).toEqual(['issuer.key.sealed', 'issuer.pem', 'root.key.sealed', 'root.pem']);
    expect(fs.readFileSync(path.join(stateDir, 'ca', 'issuer.key.sealed')).includes('PRIVATE KEY')).toBe(false);

    m = await startManager(stateDir, runDir, ['--seal-to-tpm', tcti]);
    c = await ManagerClient.connect(runDir);
    expect(await c.open({ vmUuid: uuid, version: '2.0' })).toEqual({ instance, created: false });
    expect(Buffer.from((await c.load(instance, 'permanent'))!).toString()).toBe('sealed by the host TPM');
    c.disconnect();
    expect(await m.stop()).toBe(0);

    execFileSync('tpm2_pcrextend', [`2:sha256=${'11'.repeat(32)}`], { env: { ...process.env, TPM2TOOLS_TCTI: tcti }, stdio: 'pipe' });
    const r = spawnSync(process.execPath, [CLI, 'manager', '--state', stateDir, '--run', runDir, '--seal-to-tpm', tcti], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/tpm2_unseal failed/);
  });
});
