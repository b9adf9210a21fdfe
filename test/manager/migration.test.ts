// Migration between two real manager processes (two state dirs): GET_MIG_KEY at the destination,
// LOAD_MIG_KEY + MIGRATE_OUT at the source, MIGRATE_IN at the destination; then what each side refuses.
import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
// First: the engine configures koffi, which must happen before any library (fifo.ts' libc) is loaded.
import { TpmHost } from '../../src/tpm/host.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { ManagerClient } from '../../src/manager/client.js';
import { encodeMigrateIn, readBlobHeader, type RsaPublic } from '../../src/manager/migration.js';
import { Ord, Status, encodeRequest } from '../../src/manager/wire.js';
import { CLI, perTest, rawConsole, type RunningManager } from './helpers.js';
import { tempDir } from '../helpers/temp.js';

const run = promisify(execFile);
const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const VM1 = '3a6f0c1e-8d2b-4c57-9e10-5b7a2d4c6e01';
const VM2 = '3a6f0c1e-8d2b-4c57-9e10-5b7a2d4c6e02';
const VM3 = '3a6f0c1e-8d2b-4c57-9e10-5b7a2d4c6e03';

const { managers, clients, manager } = perTest();

/** A console-attached (privileged) pair: what `vtpm migrate` uses. */
async function admin(m: RunningManager): Promise<ManagerClient> {
  const c = await ManagerClient.connect(m.runDir, { privileged: true });
  clients.push(c);
  return c;
}

async function restart(m: RunningManager): Promise<RunningManager> {
  await m.stop('SIGKILL');
  managers.splice(managers.indexOf(m), 1);
  return manager(m.stateDir, m.runDir);
}

const states = () => ({ permanent: crypto.randomBytes(70_000), volatile: crypto.randomBytes(9_000), savestate: crypto.randomBytes(3_000) });

async function createVm(c: ManagerClient, vmUuid: string, blobs = states(), opts: { migratable?: boolean } = {}): Promise<number> {
  const { instance } = await c.open({ vmUuid, version: '2.0', ...opts });
  for (const [k, v] of Object.entries(blobs)) await c.store(instance, k as keyof typeof blobs, v);
  return instance;
}

describe('vtpm manager: migration between two manager processes', () => {
  it('moves a vTPM with all its state; the source refuses it afterwards, even after restarts', async () => {
    let a = await manager();
    let b = await manager();
    let ca = await admin(a);
    let cb = await admin(b);
    const blobs = states();
    const instA = await createVm(ca, VM1, blobs);
    await createVm(cb, VM2); // B already serves another VM: the newcomer gets the next free instance

    const keyB = await cb.migrationKey();
    expect(keyB.exponent).toEqual(hex('010001'));
    expect(keyB.modulus.length).toBe(384); // RSA-3072
    await b.waitLog(/created migration key [0-9a-f]{16}… \(RSA-3072\)/);
    await ca.loadMigrationKey('hostB', keyB);
    const blob = await ca.migrateOut(VM1, 'hostB');
    await a.waitLog(new RegExp(`migrated out instance ${instA} \\(vm ${VM1}, permanent\\+volatile\\+savestate\\) to "hostB" .*counter 1`));
    const h = readBlobHeader(blob);
    expect(h).toMatchObject({ vmUuid: VM1, instance: instA, counter: 1, version: '2.0' });
    // Nothing of the state is readable in the blob.
    expect(blob.includes(blobs.permanent.subarray(0, 32))).toBe(false);

    // Source: the VM is frozen (Xen's VTPM_TYPE_MIGRATED) for OPEN, LOADNVM and SAVENVM.
    await expect(ca.load(instA, 'permanent')).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(new RegExp(`LOADNVM on instance ${instA}: instance ${instA} \\(vm ${VM1}\\) was migrated out to "hostB" \\(counter 1\\)`));
    await expect(ca.store(instA, 'permanent', Buffer.from('late'))).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await expect(ca.open({ vmUuid: VM1, version: '2.0' })).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(new RegExp(`OPEN on instance 0: vm ${VM1} \\(instance ${instA}\\) was migrated out to hostB`));
    // A backend's CLOSE after the move does not make it resumable.
    await ca.close(instA);
    await expect(ca.open({ vmUuid: VM1, version: '2.0' })).rejects.toMatchObject({ status: Status.BAD_PARAMETER });

    // Destination: registered (closed), resumed by OPEN, every blob byte for byte.
    const instB = await cb.migrateIn(blob);
    expect(instB).toBe(2);
    await b.waitLog(new RegExp(`migrated in blob [0-9a-f]{8} for vm ${VM1} \\(counter 1, from key [0-9a-f]{16}…\\) as instance 2`));
    expect(await cb.open({ vmUuid: VM1, version: '2.0' })).toEqual({ instance: instB, created: false });
    for (const [k, v] of Object.entries(blobs)) expect(Buffer.from((await cb.load(instB, k as keyof typeof blobs))!)).toEqual(v);

    // The same blob again: refused as a replay.
    await expect(cb.migrateIn(blob)).rejects.toMatchObject({ status: Status.AUTHFAIL });
    await b.waitLog(new RegExp(`MIGRATE_IN on instance 0: blob [0-9a-f]{8} for vm ${VM1} .*already took in or sent out counter 1 .*replayed`));

    // Both managers killed with -9 and restarted: everything above held (it was in the store, not in memory).
    ca.disconnect();
    cb.disconnect();
    a = await restart(a);
    b = await restart(b);
    ca = await admin(a);
    cb = await admin(b);
    await expect(ca.load(instA, 'permanent')).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await expect(ca.open({ vmUuid: VM1, version: '2.0' })).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    expect(Buffer.from((await cb.load(instB, 'permanent'))!)).toEqual(blobs.permanent);
    await cb.delete(instB); // even with the VM gone at B, the old blob stays refused there
    await expect(cb.migrateIn(blob)).rejects.toMatchObject({ status: Status.AUTHFAIL });
    expect(await cb.migrationKey()).toEqual(keyB); // the key pair survived too
    // A lost reply is recovered by asking again for the same destination: same counter, so B takes one at most.
    const again = await ca.migrateOut(instA, 'hostB');
    expect(readBlobHeader(again)).toMatchObject({ vmUuid: VM1, counter: 1 });
    expect(again.equals(blob)).toBe(false);
    await expect(cb.migrateIn(again)).rejects.toMatchObject({ status: Status.AUTHFAIL });
  });

  it('goes back and forth: each move carries a higher counter; DELETE frees the uuid at the source', async () => {
    const a = await manager();
    const b = await manager();
    const ca = await admin(a);
    const cb = await admin(b);
    const blobs = states();
    const inst = await createVm(ca, VM1, blobs);
    await ca.loadMigrationKey('b', await cb.migrationKey());
    await cb.loadMigrationKey('a', await ca.migrationKey());
    const there = await ca.migrateOut(inst, 'b');
    const instB = await cb.migrateIn(there);
    await cb.open({ vmUuid: VM1, version: '2.0' });
    const newer = crypto.randomBytes(20_000);
    await cb.store(instB, 'permanent', newer);
    const back = await cb.migrateOut(instB, 'a');
    expect(readBlobHeader(back).counter).toBe(2);
    // A still holds its frozen record: the VM is "already present" until A deletes it.
    await expect(ca.migrateIn(back)).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(new RegExp(`vm is already here as instance ${inst} \\(migrated\\); DELETE it first`));
    await ca.delete(inst);
    const inst2 = await ca.migrateIn(back, 7);
    expect(inst2).toBe(7);
    await ca.open({ vmUuid: VM1, version: '2.0' });
    expect(Buffer.from((await ca.load(inst2, 'permanent'))!)).toEqual(newer);
    expect(Buffer.from((await ca.load(inst2, 'volatile'))!)).toEqual(blobs.volatile);
  });

  it('refuses a tampered blob, a blob for another key, a VM already present, a non-migratable vTPM, naming each', async () => {
    const a = await manager();
    const b = await manager();
    const c = await manager();
    const ca = await admin(a);
    const cb = await admin(b);
    const cc = await admin(c);
    await createVm(ca, VM1);
    await createVm(ca, VM2);
    await ca.loadMigrationKey('b', await cb.migrationKey());
    await ca.loadMigrationKey('c', await cc.migrationKey());
    const blob = await ca.migrateOut(VM1, 'b');

    // Any edited byte: in the body (the GCM tag fails), in the header (it is the AAD), truncation.
    const body = Buffer.from(blob);
    body[body.length - 100]! ^= 0x01;
    await expect(cb.migrateIn(body)).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
    await b.waitLog(new RegExp(`authentication of the migration blob for vm ${VM1} \\(counter 1\\) failed: edited or truncated; answered TPM_DECRYPT_ERROR`));
    const counter = Buffer.from(blob);
    counter[39] = 5; // counter 1 → 5: would dodge the replay check if the header were not authenticated
    await expect(cb.migrateIn(counter)).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
    await expect(cb.migrateIn(blob.subarray(0, blob.length - 1))).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
    await expect(cb.migrateIn(Buffer.from('not a blob at all'))).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await b.waitLog(/not a vTPM migration blob \(17 bytes, no VTPMMIGR header\); answered TPM_BAD_PARAMETER/);

    // Made for B, offered to C: C's key fingerprint is not the one inside.
    await expect(cc.migrateIn(blob)).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
    await c.waitLog(/blob was made for migration key [0-9a-f]{16}…, this manager's key is [0-9a-f]{16}…; answered TPM_DECRYPT_ERROR/);
    // The fingerprint rewritten to C's: the wrapped key still opens only with B's private key.
    const fpC = readBlobHeader(await (async () => {
      await createVm(ca, VM3);
      return ca.migrateOut(VM3, 'c');
    })()).destination;
    const forged = Buffer.from(blob);
    fpC.copy(forged, 56);
    await expect(cc.migrateIn(forged)).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
    await c.waitLog(/the wrapped state key does not decrypt with this manager's migration key/);

    // Nothing refused above changed B: the genuine blob still goes in, once.
    expect(await cb.migrateIn(blob)).toBe(1);

    // A VM already present at the destination.
    await createVm(cc, VM2);
    const vm2 = await ca.migrateOut(VM2, 'c');
    await expect(cc.migrateIn(vm2)).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await c.waitLog(new RegExp(`for vm ${VM2} .*vm is already here as instance 1 \\(open\\); DELETE it first`));
    // An instance number already taken, asked for explicitly (Xen's "claims unavailable id").
    await cc.delete(1);
    await createVm(cc, VM1);
    await expect(cc.migrateIn(vm2, 1)).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await c.waitLog(/instance 1 already serves vm/);

    // Once migrated to B, A will not send VM1 to C as well (two live copies).
    await expect(ca.migrateOut(VM1, 'c')).rejects.toMatchObject({ status: Status.AUTHFAIL });
    await a.waitLog(/already went to "b" .*only that destination can be sent it again/);
    // Unknown destination name, a non-migratable vTPM, a key too small to trust.
    const { instance: fixed } = await ca.open({ vmUuid: crypto.randomUUID(), version: '1.2', migratable: false });
    await expect(ca.migrateOut(fixed, 'nowhere')).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(/was opened NON_MIGRATABLE \(mig_type 0\)/);
    const { instance: other } = await ca.open({ vmUuid: crypto.randomUUID(), version: '2.0' });
    await expect(ca.migrateOut(other, 'nowhere')).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(/no migration key loaded under the name "nowhere"/);
    const small = crypto.generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey.export({ format: 'jwk' });
    const weak: RsaPublic = { exponent: Buffer.from(small.e!, 'base64url'), modulus: Buffer.from(small.n!, 'base64url') };
    await expect(ca.loadMigrationKey('weak', weak)).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    await a.waitLog(/RSA modulus of 1024 bits; at least 2048 required/);
  });
});

describe('vtpm manager: migration of a real libtpms vTPM', () => {
  const host = new TpmHost();
  afterEach(() => host.destroyAll());

  it('its NV index, persistent key and PCR 16 (volatile state) come back from the destination manager', async () => {
    const a = await manager();
    const b = await manager();
    const ca = await admin(a);
    const cb = await admin(b);
    const { instance } = await ca.open({ vmUuid: VM1, version: '2.0' });
    // The engine stores through the manager client (it is the StateStore), as the backend does.
    const src = await host.create({ instance, version: '2.0', store: ca, startup: 'clear' });
    const nv = crypto.randomBytes(32);
    tpm2.expectSuccess(await src.execute(tpm2.nvDefineSpace(0x01500044, 32)), 'NV_DefineSpace');
    tpm2.expectSuccess(await src.execute(tpm2.nvWrite(0x01500044, nv)), 'NV_Write');
    const primary = tpm2.parseCreatePrimaryHandle(await src.execute(tpm2.createPrimaryRsa(2048)));
    tpm2.expectSuccess(await src.execute(tpm2.evictControl(primary, 0x81000044)), 'EvictControl');
    tpm2.expectSuccess(await src.execute(tpm2.pcrExtendSha256(16, crypto.randomBytes(32))), 'PCR_Extend');
    const pcr = tpm2.parsePcrRead(await src.execute(tpm2.pcrReadSha256(16)));
    await src.saveVolatile(); // what the backend does at suspend
    await host.destroy(instance);

    await ca.loadMigrationKey('b', await cb.migrationKey());
    const blob = await ca.migrateOut(VM1, 'b');
    const instB = await cb.migrateIn(blob, 9);
    expect(instB).toBe(9);
    await cb.open({ vmUuid: VM1, version: '2.0' });
    // Power-on at the destination resumes the volatile state: no Startup, PCR 16 as it was.
    const dst = await host.create({ instance: instB, version: '2.0', store: cb });
    expect(tpm2.parsePcrRead(await dst.execute(tpm2.pcrReadSha256(16)))).toEqual(pcr);
    expect(Buffer.from(tpm2.parseNvRead(await dst.execute(tpm2.nvRead(0x01500044, 32))))).toEqual(nv);
    expect(tpm2.parseHandles(await dst.execute(tpm2.getHandles()))).toContain(0x81000044);
  });
});

describe('vtpm manager: migration wire bytes', () => {
  it('GET_MIG_KEY, LOAD_MIG_KEY, MIGRATE_OUT, MIGRATE_IN and TPMCOMMAND on the raw FIFOs', async () => {
    const a = await manager();
    const b = await manager();
    const ca = await admin(a);
    const { instance } = await ca.open({ vmUuid: VM1, version: '2.0' });
    expect(instance).toBe(1);
    await ca.store(instance, 'permanent', Buffer.from('permanent state of vm1'));

    // GET_MIG_KEY (4), no parameters → u32 exponent size ‖ exponent ‖ u32 modulus size ‖ modulus.
    const keyRsp = await rawConsole(b.runDir, hex('00000000 01c1 0000000a 00000004'));
    expect(keyRsp.subarray(0, 25)).toEqual(hex('00000000 01c1 00000195 00000000  00000003 010001  00000180'));
    expect(keyRsp.length).toBe(4 + 0x195);
    const modulus = keyRsp.subarray(25);
    expect(modulus[0]! & 0x80).toBe(0x80); // a full 3072-bit modulus
    // LOAD_MIG_KEY (5): u32 name size ‖ "hostB\0" ‖ the key as GET_MIG_KEY gave it → status only.
    const load = Buffer.concat([hex('00000006'), Buffer.from('hostB\0'), keyRsp.subarray(14)]);
    expect(await rawConsole(a.runDir, Buffer.concat([hex(`00000000 01c1 ${(10 + load.length).toString(16).padStart(8, '0')} 00000005`), load]))).toEqual(
      hex('00000000 01c1 0000000a 00000000'),
    );
    // MIGRATE_OUT (0x01000005): instance 1 ‖ u32 6 ‖ "hostB\0" → the blob.
    const out = await rawConsole(a.runDir, hex('00000000 01c1 00000018 01000005 00000001 00000006 686f73744200'));
    expect(out.subarray(0, 14)).toEqual(Buffer.concat([hex('00000000 01c1'), u32(out.length - 4), hex('00000000')]));
    const blob = out.subarray(14);
    // Blob header: "VTPMMIGR", format 1, TPM 2.0 (2), vm type PVM (1), reserved, uuid, source instance 1, counter 1.
    expect(blob.subarray(0, 40)).toEqual(hex(`5654504d4d494752 01 02 01 00 ${VM1.replace(/-/g, '')} 00000001 0000000000000001`));
    expect(blob.readUInt16BE(120)).toBe(384); // the wrapped AES key: one RSA-3072 block
    // MIGRATE_IN (0x01000004): instance 0 (any) ‖ u32 blob size ‖ blob → instance u32 (ours; Xen sent none).
    const params = encodeMigrateIn(0, blob);
    expect(params.subarray(0, 8)).toEqual(Buffer.concat([hex('00000000'), u32(blob.length)]));
    expect(await rawConsole(b.runDir, Buffer.concat([hex('00000000 01c1'), u32(10 + params.length), hex('01000004'), params]))).toEqual(
      hex('00000000 01c1 0000000e 00000000 00000001'),
    );
    // A non-privileged pair may read the key but not load one (TPM_BAD_ORDINAL, 10); TPMCOMMAND is refused with TPM_FAIL (9).
    const plain = await ManagerClient.connect(b.runDir);
    clients.push(plain);
    expect((await plain.request(0, Ord.GET_MIG_KEY)).params).toEqual(keyRsp.subarray(14));
    expect((await plain.request(1, Ord.LOAD_MIG_KEY, load)).code).toBe(Status.BAD_ORDINAL);
    expect((await plain.request(1, Ord.MIGRATE_IN, params)).code).toBe(Status.BAD_ORDINAL);
    const tpm = await plain.request(1, Ord.TPMCOMMAND, hex('8001 0000000c 0000017b 0008'));
    expect(encodeRequest(1, Ord.TPMCOMMAND, hex('8001 0000000c 0000017b 0008'))).toEqual(hex('00000001 01c1 00000016 00000003 8001 0000000c 0000017b 0008'));
    expect(tpm).toMatchObject({ instance: 1, code: Status.FAIL });
    await b.waitLog(/TPMCOMMAND passes a vTPM's command through to the host's hardware TPM/);
    // The migrated state arrived.
    await (await admin(b)).open({ vmUuid: VM1, version: '2.0' });
    expect(Buffer.from((await plain.load(1, 'permanent'))!).toString()).toBe('permanent state of vm1');
  });
});

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

describe('vtpm manager: MIGRATE_IN fuzz', () => {
  it('random and mutated MIGRATE_IN parameters never succeed or crash the manager; another client keeps working', async () => {
    const a = await manager();
    const b = await manager();
    const ca = await admin(a);
    const cb = await admin(b);
    await createVm(ca, VM1, { permanent: crypto.randomBytes(2000), volatile: crypto.randomBytes(300), savestate: crypto.randomBytes(100) });
    await ca.loadMigrationKey('b', await cb.migrationKey());
    const blob = await ca.migrateOut(VM1, 'b');
    const inst = await createVm(cb, VM2, { permanent: Buffer.from('p'), volatile: Buffer.from('v'), savestate: Buffer.from('s') });
    const worker = await ManagerClient.connect(b.runDir);
    clients.push(worker);
    let saves = 0;
    const params = fc.oneof(
      fc.uint8Array({ maxLength: 600 }),
      // Xen's layout around random bytes, sizes that lie included.
      fc.tuple(fc.nat(), fc.nat(), fc.uint8Array({ maxLength: 600 })).map(([i, n, d]) => Buffer.concat([u32(i), u32(n), d])),
      // The genuine blob with a few bytes changed, or cut.
      fc.tuple(fc.uniqueArray(fc.tuple(fc.nat(blob.length - 1), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4, selector: ([at]) => at }), fc.nat(blob.length)).map(([edits, cut]) => {
        const x = Buffer.from(blob);
        for (const [at, v] of edits) x[at]! ^= v;
        return encodeMigrateIn(0, cut % 3 === 0 ? x.subarray(0, cut) : x);
      }),
    );
    await fc.assert(
      fc.asyncProperty(params, async (p) => {
        const [r] = await Promise.all([cb.request(0, Ord.MIGRATE_IN, p), worker.store(inst, 'volatile', Buffer.from(`save ${++saves}`))]);
        expect(r.code).not.toBe(Status.SUCCESS);
        expect(Buffer.from((await worker.load(inst, 'volatile'))!).toString()).toBe(`save ${saves}`);
      }),
      { numRuns: 150 },
    );
    expect(b.proc.exitCode).toBeNull();
    // After all that the genuine blob is still accepted, once.
    expect(await cb.migrateIn(blob)).toBe(2);
  });
});

describe('vtpm migrate (CLI)', () => {
  it('key / out / show / in between two managers, and the refusals as exit codes', async () => {
    const a = await manager();
    const b = await manager();
    const ca = await admin(a);
    const blobs = states();
    await createVm(ca, VM1, blobs);
    const work = tempDir('mig-cli');
    const vtpm = (...args: string[]) => run(process.execPath, [CLI, 'migrate', ...args]);
    const keyFile = path.join(work, 'b.pem');
    const { stdout: fp } = await vtpm('key', '--run', b.runDir, '--out', keyFile);
    expect(fs.readFileSync(keyFile, 'utf8')).toMatch(/^-----BEGIN PUBLIC KEY-----/);
    expect(crypto.createHash('sha256').update(crypto.createPublicKey(fs.readFileSync(keyFile)).export({ format: 'der', type: 'spki' })).digest('hex')).toBe(fp.trim());
    const blobFile = path.join(work, 'vm1.mig');
    const out = await vtpm('out', '--run', a.runDir, '--vm', VM1, '--to-key', keyFile, '--out', blobFile);
    expect(out.stdout).toMatch(new RegExp(`vm ${VM1} instance 1 counter 1: \\d+ bytes to ${blobFile}`));
    const shown = JSON.parse((await vtpm('show', '--blob', blobFile)).stdout) as { vmUuid: string; counter: number; destinationKey: string };
    expect(shown).toMatchObject({ vmUuid: VM1, counter: 1, destinationKey: fp.trim() });
    expect((await vtpm('in', '--run', b.runDir, '--blob', blobFile)).stdout).toBe(`vm ${VM1}: instance 1\n`);
    await expect(vtpm('in', '--run', b.runDir, '--blob', blobFile)).rejects.toMatchObject({ code: 1, stderr: expect.stringMatching(/the blob was refused: it is a replayed or stale blob/) });
    const cb = await admin(b);
    await cb.open({ vmUuid: VM1, version: '2.0' });
    expect(Buffer.from((await cb.load(1, 'savestate'))!)).toEqual(blobs.savestate);
    await expect(vtpm('out', '--run', a.runDir, '--instance', '1', '--vm', VM1, '--to-key', keyFile, '--out', blobFile)).rejects.toMatchObject({
      stderr: expect.stringMatching(/give exactly one of --vm UUID and --instance N/),
    });
  });
});
