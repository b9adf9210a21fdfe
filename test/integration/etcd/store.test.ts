// The manager's etcd store seen from etcd's side, on a real 3-member cluster started here: what it
// writes (sealed records, no plaintext, no VM uuid), that every write is conditioned on the writer's
// claim (a revoked lease stops writes at etcd itself), group commit, and refusals of a wrong master key,
// a rolled-back blob and an edited record.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { ROOT } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { ManagerClient, ManagerError } from '../../../src/manager/client.js';
import { Status } from '../../../src/manager/wire.js';
import { openRecord } from '../../../src/manager/etcd-record.js';
import { Sealer } from '../../../src/manager/seal.js';
import { EtcdCluster } from '../../../scripts/bench/_etcd.js';

const cli = join(ROOT, 'dist/src/cli/main.js');
const work = tempDir('etcd-store');
const key = join(work, 'master.key');
const masterKey = randomBytes(32);
let etcd: EtcdCluster;
let kv: Etcd3;
const managers: ChildProcess[] = [];

/** `vtpm manager --store etcd://…` as a process; resolves when ready (or rejects with its stderr when it exits). */
function manager(name: string, extra: string[] = [], keyFile = key): Promise<{ proc: ChildProcess; run: string; log: () => string }> {
  const run = join(work, `${name}-run`);
  let log = '';
  const proc = spawn(process.execPath, [cli, 'manager', '--state', join(work, `${name}-state`), '--run', run, '--store', etcd.url, '--master-key', keyFile, '--lease-ttl', '4', ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: '4' },
  });
  managers.push(proc);
  return new Promise((resolve, reject) => {
    proc.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      if (/vtpm-manager: ready/.test(log)) resolve({ proc, run, log: () => log });
    });
    proc.on('exit', (code) => reject(new Error(`manager ${name} exited ${code}: ${log}`)));
  });
}

async function stop(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  await gone;
}

const all = async () => (await kv.getAll().prefix('vtpm/').buffers()) as Record<string, Buffer>;

beforeAll(async () => {
  etcd = await EtcdCluster.start(3, { dir: join(work, 'etcd') });
  fs.writeFileSync(key, masterKey, { mode: 0o600 });
  kv = new Etcd3({ hosts: etcd.endpoints.split(',').map((e) => `http://${e}`), grpcOptions: { 'grpc.max_receive_message_length': 64 * 1024 * 1024 } });
}, 60_000);

afterAll(async () => {
  for (const p of managers) await stop(p);
  kv?.close();
  await etcd?.stop();
  removeDir(work);
}, 60_000);

describe('the etcd store', () => {
  it('etcd holds only sealed values and no VM uuid; a record is VTPMETCD | salt 16 | GCM tag 16 | ciphertext', async () => {
    const m = await manager('bytes');
    const c = await ManagerClient.connect(m.run);
    const vm = randomUUID();
    const state = Buffer.from('PLAINTEXT-PERMANENT-STATE-'.repeat(8));
    try {
      const { instance } = await c.open({ vmUuid: vm, version: '2.0' });
      await c.store(instance, 'permanent', state);
      expect(Buffer.from((await c.load(instance, 'permanent'))!)).toEqual(state);
      const kvs = await all();
      const names = Object.keys(kvs);
      expect(names).toContain(`vtpm/blob/${instance}/permanent`);
      const rec = names.find((n) => n.startsWith('vtpm/vm/'))!;
      expect(rec).toMatch(/^vtpm\/vm\/[0-9a-f]{32}$/);
      for (const [n, v] of Object.entries(kvs)) {
        expect(n).not.toContain(vm);
        expect(v.includes(Buffer.from(vm))).toBe(false);
        expect(v.includes(Buffer.from('PLAINTEXT'))).toBe(false);
      }
      // The record's bytes: magic, salt, tag, AES-256-GCM ciphertext; it opens under the metadata key.
      const v = kvs[rec]!;
      expect(v.subarray(0, 8).toString('ascii')).toBe('VTPMETCD');
      expect(v.length).toBeGreaterThan(8 + 16 + 16);
      const opened = openRecord(new Sealer(masterKey).metaKey(), rec.slice('vtpm/'.length), v) as { vm: { vmUuid: string; instance: number }; gens: Record<string, number> };
      expect(opened.vm).toMatchObject({ vmUuid: vm, instance });
      expect(opened.gens.permanent).toBeGreaterThan(0);
      // The blob is seal.ts's envelope: "VTPMSEAL", format 2, kind 0, instance, uuid, generation.
      const blob = kvs[`vtpm/blob/${instance}/permanent`]!;
      expect(blob.subarray(0, 10).toString('hex')).toBe(Buffer.concat([Buffer.from('VTPMSEAL'), Buffer.from([2, 0])]).toString('hex'));
      expect(Number(blob.readBigUInt64BE(30))).toBe(opened.gens.permanent);
    } finally {
      c.disconnect();
      await stop(m.proc);
    }
  }, 60_000);

  it('a save after the claim\'s lease is revoked is refused by etcd (TPM_FAIL) and changes nothing there', async () => {
    const m = await manager('fence');
    const c = await ManagerClient.connect(m.run);
    try {
      const { instance } = await c.open({ vmUuid: randomUUID(), version: '2.0' });
      await c.store(instance, 'permanent', Buffer.from('first'));
      const before = (await all())[`vtpm/blob/${instance}/permanent`];
      // What a lease expiring in etcd does (the host paused or cut off past the TTL), at once.
      const claims = Object.entries((await kv.getAll().prefix('vtpm/claim/').exec()).kvs.map((x) => [x.key.toString(), x.lease] as const));
      expect(claims.length).toBeGreaterThan(0);
      for (const [, [, lease]] of claims) await kv.leaseClient.leaseRevoke({ ID: lease });
      const err = await c.store(instance, 'permanent', Buffer.from('second')).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(ManagerError);
      expect((err as ManagerError).status).toBe(Status.FAIL);
      expect((await all())[`vtpm/blob/${instance}/permanent`]).toEqual(before);
      expect(m.log()).toMatch(/no longer holds vm .*nobody holds it now.*write refused/);
      // The next OPEN claims under a new lease.
      const next = await c.open({ vmUuid: randomUUID(), version: '2.0' });
      await c.store(next.instance, 'permanent', Buffer.from('new lease'));
      expect(m.log()).toMatch(/lease \S+ lost \(etcd/);
    } finally {
      c.disconnect();
      await stop(m.proc);
    }
  }, 60_000);

  it('64 clients saving at once share transactions (group commit)', async () => {
    const m = await manager('group');
    const clients = await Promise.all(Array.from({ length: 64 }, () => ManagerClient.connect(m.run)));
    try {
      // ek 'none': no manufacture at OPEN, so the saves counted below are the test's own.
      const inst = await Promise.all(clients.map((c) => c.open({ vmUuid: randomUUID(), version: '2.0', ek: 'none' }).then((o) => o.instance)));
      for (let round = 0; round < 5; round++) await Promise.all(clients.map((c, i) => c.store(inst[i]!, 'volatile', randomBytes(9000))));
      for (const [i, c] of clients.entries()) expect((await c.load(inst[i]!, 'volatile'))!.length).toBe(9000);
      // Saves of one VM sent back to back while other transactions fly: the last one sent is what stays.
      const burst = Array.from({ length: 20 }, (_, k) => Buffer.from(`save number ${k}`));
      await Promise.all([
        ...burst.map((b) => clients[0]!.store(inst[0]!, 'permanent', b)),
        ...clients.slice(1).map((c, i) => c.store(inst[i + 1]!, 'permanent', randomBytes(9000))),
      ]);
      expect(Buffer.from((await clients[0]!.load(inst[0]!, 'permanent'))!).toString()).toBe('save number 19');
    } finally {
      for (const c of clients) c.disconnect();
      await stop(m.proc);
    }
    const [, saves, commits] = /stopped \((\d+) saves in (\d+) commits/.exec(m.log())!;
    expect(Number(saves)).toBe(320 + 20 + 63);
    // One transaction per save would be 403 (+ 64 table commits); batches carry up to 40 VMs each.
    expect(Number(commits)).toBeLessThan(250);
  }, 120_000);

  it('saves of large blobs at once are split into transactions under etcd\'s request limit, and all succeed', async () => {
    const m = await manager('large');
    const clients = await Promise.all(Array.from({ length: 16 }, () => ManagerClient.connect(m.run)));
    try {
      const inst = await Promise.all(clients.map((c) => c.open({ vmUuid: randomUUID(), version: '2.0' }).then((o) => o.instance)));
      const blobs = clients.map(() => randomBytes(256 * 1024)); // 4 MiB together; etcd takes 1.5 MiB a request
      await Promise.all(clients.map((c, i) => c.store(inst[i]!, 'permanent', blobs[i]!)));
      for (const [i, c] of clients.entries()) expect(Buffer.from((await c.load(inst[i]!, 'permanent'))!).equals(blobs[i]!)).toBe(true);
    } finally {
      for (const c of clients) c.disconnect();
      await stop(m.proc);
    }
  }, 120_000);

  it('DELETE removes the VM\'s record, blobs, instance number and claim in one transaction; refused while another host holds it', async () => {
    const a = await manager('del-a');
    const b = await manager('del-b');
    const ca = await ManagerClient.connect(a.run);
    const cb = await ManagerClient.connect(b.run);
    try {
      const vm = randomUUID();
      const { instance } = await ca.open({ vmUuid: vm, version: '2.0' });
      await ca.store(instance, 'permanent', Buffer.from('to be deleted'));
      await ca.store(instance, 'volatile', Buffer.from('this too'));
      const mine = (kvs: Record<string, Buffer>) => Object.keys(kvs).filter((n) => n.startsWith(`vtpm/blob/${instance}/`) || n === `vtpm/inst/${instance}`);
      expect(mine(await all()).sort()).toEqual([`vtpm/blob/${instance}/permanent`, `vtpm/blob/${instance}/volatile`, `vtpm/inst/${instance}`]);
      // B knows the VM (it reads the table on OPEN) but may not delete it while A holds it.
      await expect(cb.open({ vmUuid: vm, version: '2.0' })).rejects.toMatchObject({ status: Status.AUTHFAIL });
      await expect(cb.delete(instance)).rejects.toMatchObject({ status: Status.AUTHFAIL });
      const before = Object.keys(await all()).length;
      await ca.close(instance);
      await ca.delete(instance);
      const after = await all();
      expect(mine(after)).toEqual([]);
      expect(Object.keys(after).length).toBe(before - 5); // two blobs, the record, the instance number, the claim
      // The uuid is free again: B creates a new vTPM for it.
      expect(await cb.open({ vmUuid: vm, version: '2.0' })).toMatchObject({ created: true });
    } finally {
      ca.disconnect();
      cb.disconnect();
      await stop(a.proc);
      await stop(b.proc);
    }
  }, 60_000);

  it('refuses a rolled-back blob (TPM_DECRYPT_ERROR) and a manager with another master key', async () => {
    const m = await manager('tamper');
    const c = await ManagerClient.connect(m.run);
    try {
      const { instance } = await c.open({ vmUuid: randomUUID(), version: '2.0' });
      await c.store(instance, 'permanent', Buffer.from('generation one'));
      const old = (await kv.get(`vtpm/blob/${instance}/permanent`).buffer())!;
      await c.store(instance, 'permanent', Buffer.from('generation two'));
      await kv.put(`vtpm/blob/${instance}/permanent`).value(old);
      const err = await c.load(instance, 'permanent').then(() => null, (e: unknown) => e);
      expect((err as ManagerError).status).toBe(Status.DECRYPT_ERROR);
      // A VM record edited in etcd: that VM is refused (never made anew as a fresh TPM); others open.
      const vm = randomUUID();
      const damaged = await c.open({ vmUuid: vm, version: '2.0' });
      await c.store(damaged.instance, 'permanent', Buffer.from('state'));
      await c.close(damaged.instance);
      const rec = Object.entries(await all()).find(([n, v]) => n.startsWith('vtpm/vm/') && (openRecord(new Sealer(masterKey).metaKey(), n.slice(5), v) as { vm: { vmUuid: string } }).vm.vmUuid === vm)!;
      const edited = Buffer.from(rec[1]);
      edited[edited.length - 1]! ^= 1;
      await kv.put(rec[0]).value(edited);
      await expect(c.open({ vmUuid: vm, version: '2.0' })).rejects.toMatchObject({ status: Status.DECRYPT_ERROR });
      expect(m.log()).toMatch(new RegExp(`etcd key ${rec[0].slice(5)} fails authentication`));
      await expect(c.open({ vmUuid: randomUUID(), version: '2.0' })).resolves.toMatchObject({ created: true });
    } finally {
      c.disconnect();
      await stop(m.proc);
    }
    const other = join(work, 'other.key');
    fs.writeFileSync(other, randomBytes(32), { mode: 0o600 });
    await expect(manager('wrong-key', [], other)).rejects.toThrow(/master key does not open vtpm\/keycheck/);
  }, 60_000);
});
