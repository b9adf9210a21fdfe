// The manager as Xen's hotplug scripts and vtpm_migrator saw it (issue #23), and hostile writers on its
// FIFOs (issue #15 items 5 and 7): the exact bytes, read back the way the scripts read them.
import { afterEach, describe, expect, it, onTestFinished } from 'vitest';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { mkfifo } from '../../native/fifo.js';
import { ManagerClient } from '../../src/manager/client.js';
import { openReader, writeShared } from '../../src/manager/fifo.js';
import { connectPair } from '../../src/manager/fifo-client.js';
import { fingerprint, readBlobHeader } from '../../src/manager/migration.js';
import { Ord, encodeConnect, encodeRequest } from '../../src/manager/wire.js';
import { perTest, rawConsole, startManager, type RunningManager } from './helpers.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const VM1 = '5c2e9a10-7b3d-4f61-8a24-0d9e6c1b3a01';
const XEN_RUN = '/var/vtpm/fifos';

const { managers, clients, manager } = perTest();

/** printf's \xNN form of some bytes, as vtpm-impl spells its commands. */
const printfEscaped = (b: Buffer): string => [...b].map((x) => `\\x${x.toString(16).padStart(2, '0')}`).join('');

/**
 * Runs one request per line the way vtpm-impl's vtpm_manager_cmd does: printf the frame into
 * from_console.fifo, then `dd skip=10 bs=1 count=4` on to_console.fifo (a new reader each time, exactly
 * 14 bytes read), and prints the 4 status bytes in hex. Written here, not copied.
 */
async function hotplug(runDir: string, frames: Buffer[]): Promise<string[]> {
  const body = frames
    .map((f) => `printf '${printfEscaped(f)}' > "$RUN/from_console.fifo"; dd skip=10 bs=1 count=4 if="$RUN/to_console.fifo" 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo`)
    .join('\n');
  return new Promise((resolve, reject) => {
    const p = spawn('bash', ['-c', `set -e\n${body}`], { env: { ...process.env, RUN: runDir }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const t = setTimeout(() => p.kill('SIGKILL'), 60_000);
    p.on('exit', (code) => {
      clearTimeout(t);
      if (code === 0) resolve(out.trim().split('\n'));
      else reject(new Error(`hotplug script exit ${code}: ${err}; out so far: ${out}`));
    });
  });
}

/** Bytes left in a FIFO nobody else reads (the manager holds to_console.fifo open, so a leftover stays). */
function leftover(file: string): Buffer {
  const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  try {
    const b = Buffer.alloc(4096);
    try {
      return b.subarray(0, fs.readSync(fd, b));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return Buffer.alloc(0);
      throw e;
    }
  } finally {
    fs.closeSync(fd);
  }
}

const u32 = (n: number): string => n.toString(16).padStart(8, '0');
const open = (inst: number, mode = 1, vmType = 1): Buffer => hex(`00000000 01c1 00000011 01000001 01 ${u32(mode).slice(6)} ${u32(vmType).slice(6)} ${u32(inst)}`);
const close = (inst: number): Buffer => hex(`00000000 01c1 0000000e 01000002 ${u32(inst)}`);
const del = (inst: number): Buffer => hex(`00000000 01c1 0000000e 01000003 ${u32(inst)}`);

describe("Xen's hotplug scripts against the manager (issue #23)", () => {
  const created: string[] = [];
  afterEach(() => {
    // The run directory at Xen's path is ours only for the test: leave nothing behind.
    for (const d of created.splice(0)) removeDir(d);
  });

  it('runs at /var/vtpm/fifos: each 14-byte dd read gets its own status, a failure does not put later replies out of step', async () => {
    if (fs.existsSync(path.join(XEN_RUN, 'manager.pid'))) throw new Error(`${XEN_RUN} is in use by another manager; this test needs Xen's path to itself`);
    created.push(fs.existsSync('/var/vtpm') ? XEN_RUN : '/var/vtpm');
    const stateDir = tempDir('state');
    created.push(stateDir);
    const m = await manager(stateDir, XEN_RUN);
    for (const f of ['from_console.fifo', 'to_console.fifo']) expect(fs.lstatSync(path.join(XEN_RUN, f)).isFIFO()).toBe(true);
    const statuses = await hotplug(XEN_RUN, [
      close(9), // nobody opened 9: TPM_BAD_PARAMETER
      open(9), // vtpm_start: created
      open(9), // again while open: Xen refused the re-attach
      close(9), // vtpm_suspend
      open(9, 2, 2), // vtpm_resume of an HVM guest
      close(9),
      del(9), // vtpm_delete
      del(9), // gone
      open(10), // a later valid request after all that
    ]);
    expect(statuses).toEqual(['00000003', '00000000', '00000003', '00000000', '00000000', '00000000', '00000000', '00000003', '00000000']);
    // Nothing left in the reply FIFO for the next script to read by mistake.
    expect(leftover(path.join(XEN_RUN, 'to_console.fifo'))).toEqual(Buffer.alloc(0));
    await m.waitLog(/console: CLOSE on instance 0: no vTPM instance 9; answered TPM_BAD_PARAMETER$/);
    await m.waitLog(/created instance 9 for vm 00000000-0000-4000-8000-000000000009 \(TPM 1\.2\)/);
    await m.waitLog(/console: OPEN on instance 0: instance 9 is already open \(CLOSE it first\); answered TPM_BAD_PARAMETER/);
    await m.waitLog(/deleted instance 9/);
  });

  it('loads a Xen-style migration key (RSA-2048, exponent size 0 = 65537) and seals a MIGRATE_OUT blob to it', async () => {
    const m = await manager();
    const admin = await ManagerClient.connect(m.runDir, { privileged: true });
    clients.push(admin);
    const { instance } = await admin.open({ vmUuid: VM1, version: '1.2' });
    await admin.store(instance, 'permanent', Buffer.from('nvm of the vm'));
    const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 65537 });
    const modulus = Buffer.from(publicKey.export({ format: 'jwk' }).n!, 'base64url');
    expect(modulus.length).toBe(256);
    // LOAD_MIG_KEY (5): u32 name size ‖ "xenhost\0" ‖ u32 0 (no exponent bytes) ‖ u32 256 ‖ modulus.
    const params = Buffer.concat([hex('00000008'), Buffer.from('xenhost\0'), hex('00000000 00000100'), modulus]);
    const frame = Buffer.concat([hex(`00000000 01c1 ${u32(10 + params.length)} 00000005`), params]);
    expect(frame.subarray(0, 34)).toEqual(hex('00000000 01c1 0000011e 00000005 00000008 78656e686f737400 00000000 00000100'));
    expect(await rawConsole(m.runDir, frame)).toEqual(hex('00000000 01c1 0000000a 00000000'));
    await m.waitLog(new RegExp(`loaded migration key "xenhost" ${fingerprint(publicKey).toString('hex').slice(0, 16)}`));
    // The blob is for exactly that key: its fingerprint inside, and the wrapped state key opens with the private half.
    const blob = await admin.migrateOut(instance, 'xenhost');
    const h = readBlobHeader(blob);
    expect(h.destination).toEqual(fingerprint(publicKey));
    expect(h.wrappedLen).toBe(256);
    const wrapped = blob.subarray(122, 122 + h.wrappedLen);
    const stateKey = crypto.privateDecrypt({ key: privateKey, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped);
    expect(stateKey.length).toBe(32);
    // An exponent of size 0 is 65537, nothing else: an even or tiny explicit exponent is still refused.
    const bad = Buffer.concat([hex('00000004'), Buffer.from('bad\0'), hex('00000001 02 00000100'), modulus]);
    expect(await rawConsole(m.runDir, Buffer.concat([hex(`00000000 01c1 ${u32(10 + bad.length)} 00000005`), bad]))).toEqual(hex('00000000 01c1 0000000a 00000003'));
  });
});

describe('hostile writers on the shared FIFOs (issue #15 item 5)', () => {
  // The 14 bytes of the report: a CONNECT header promising 8 MiB of parameters that never come.
  const HALF = hex('00000000 01c1 0080000a 00000100');

  it('a half frame on rendezvous.fifo or from_console.fifo costs one log line; later CONNECTs and console requests succeed', async () => {
    const m = await manager();
    writeShared(path.join(m.runDir, 'rendezvous.fifo'), HALF);
    await m.waitLog(/rendezvous: size 8388618 exceeds the limit of 4092 for a FIFO with several writers; 14 bytes skipped \(0000000001c10080000a00000100\)$/);
    const c1 = await ManagerClient.connect(m.runDir, { timeoutMs: 5000 });
    clients.push(c1);
    writeShared(path.join(m.runDir, 'from_console.fifo'), HALF);
    await m.waitLog(/console: size 8388618 exceeds the limit of 4092 for a FIFO with several writers; 14 bytes skipped \(0000000001c10080000a00000100\); frame dropped, no reply$/);
    // A CONNECT on the console (a privileged pair) and a plain console exchange both still work.
    const admin = await ManagerClient.connect(m.runDir, { privileged: true, timeoutMs: 5000 });
    clients.push(admin);
    expect(await rawConsole(m.runDir, open(3))).toEqual(hex('00000000 01c1 0000000a 00000000'));
    // A header with a plausible size but fewer bytes than it promises: dropped at the end of its write.
    writeShared(path.join(m.runDir, 'rendezvous.fifo'), hex('00000000 01c1 00000020 00000100 0000'));
    await m.waitLog(/rendezvous: half frame: its header promises 36 bytes, the write held 16; 16 bytes skipped/);
    const c2 = await ManagerClient.connect(m.runDir, { timeoutMs: 5000 });
    clients.push(c2);
    // Instance 3 is a TPM 1.2 the console OPEN manufactured (docs/ek-certificates.md): its permanent state is there.
    expect(await c2.load(3, 'permanent')).not.toBeNull();
    expect(m.proc.exitCode).toBeNull();
  });

  it('garbage and a real CONNECT in one read: the CONNECT is found after the garbage and attached', async () => {
    const m = await manager();
    // One write holding garbage, the report's half frame and then a genuine CONNECT: the reader skips to it.
    const name = `glued${process.pid}`;
    const dir = path.join(m.runDir, 'clients');
    mkfifo(path.join(dir, `${name}.req.fifo`), 0o600);
    mkfifo(path.join(dir, `${name}.rsp.fifo`), 0o600);
    const rsp = openReader(path.join(dir, `${name}.rsp.fifo`));
    const ack = new Promise<Buffer>((resolve) => rsp.once('data', (d: Buffer) => resolve(d)));
    const connect = encodeRequest(0, Ord.CONNECT, encodeConnect({ bind: 0xffffffff, pid: process.pid, name }));
    writeShared(path.join(m.runDir, 'rendezvous.fifo'), Buffer.concat([hex('deadbeef'), HALF, connect]));
    try {
      expect(await ack).toEqual(hex('ffffffff 01c1 0000000a 00000000'));
    } finally {
      rsp.destroy();
    }
    await m.waitLog(new RegExp(`client ${name} \\(pid ${process.pid}\\) attached`));
    await m.waitLog(/rendezvous: invalid tag 0x0000; 18 bytes skipped \(deadbeef0000000001c10080000a0000…\)$/);
  });
});

describe('a client that stops reading its replies (issue #15 item 7)', () => {
  it('is cut off alone once its unread replies pass the bound; another client keeps loading', async () => {
    const m = await manager();
    const good = await ManagerClient.connect(m.runDir);
    clients.push(good);
    const admin = await ManagerClient.connect(m.runDir, { privileged: true });
    clients.push(admin);
    const { instance } = await admin.open({ vmUuid: VM1, version: '2.0' });
    const big = crypto.randomBytes(4 * 1024 * 1024);
    await good.store(instance, 'permanent', big);
    // The stalled client asks for the 4 MiB blob six times and reads nothing: 24 MiB would queue.
    const stalled = await connectPair(m.runDir, { name: 'stalled' });
    stalled.reader.socket.pause();
    for (let i = 0; i < 6; i++) stalled.writer.write(encodeRequest(instance, Ord.LOADNVM));
    await m.waitLog(/client stalled \(pid \d+\) detached: stopped reading its replies: \d+ bytes queued \(limit 16777244\)/, 60_000);
    expect(Buffer.from((await good.load(instance, 'permanent'))!).equals(big)).toBe(true);
    stalled.reader.close();
    stalled.writer.destroy();
    for (const f of stalled.files) expect(fs.existsSync(f)).toBe(false); // the manager dropped its pair
  });

  it('is cut off after --client-stall-ms with replies unread, however few', async () => {
    const stateDir = tempDir('state');
    const runDir = tempDir('run');
    const m: RunningManager = await startManager(stateDir, runDir, ['--client-stall-ms', '1000']);
    managers.push(m);
    onTestFinished(() => {
      for (const d of [stateDir, runDir]) removeDir(d);
    });
    const admin = await ManagerClient.connect(runDir, { privileged: true });
    clients.push(admin);
    const { instance } = await admin.open({ vmUuid: VM1, version: '2.0' });
    await admin.store(instance, 'permanent', crypto.randomBytes(512 * 1024));
    const stalled = await connectPair(runDir, { name: 'slowpoke' });
    stalled.reader.socket.pause();
    stalled.writer.write(encodeRequest(instance, Ord.LOADNVM));
    await m.waitLog(/client slowpoke \(pid \d+\) detached: stopped reading its replies: \d+ bytes unread for 1000 ms/, 30_000);
    // The admin pair was never stalled and still answers.
    expect((await admin.load(instance, 'permanent'))!.length).toBe(512 * 1024);
    stalled.reader.close();
    stalled.writer.destroy();
  });

  it('console replies nobody reads pile up only to a bound: later ones are dropped with a log line', async () => {
    const m = await manager();
    // GET_MIG_KEY answers 409 bytes; 3000 of them unread are far past the pipe (64 KiB) and the 1 MiB bound.
    const ask = hex('00000000 01c1 0000000a 00000004');
    for (let i = 0; i < 3000; i++) {
      for (;;) {
        try {
          writeShared(path.join(m.runDir, 'from_console.fifo'), ask);
          break;
        } catch (e) {
          if ((e as { code?: string }).code !== 'PIPE_FULL') throw e;
          await new Promise((r) => setTimeout(r, 5));
        }
      }
    }
    await m.waitLog(/console: GET_MIG_KEY reply dropped: to_console\.fifo is full of replies nobody read/, 60_000);
    // One log line for the whole episode, not one per dropped reply.
    await new Promise((r) => setTimeout(r, 500));
    expect(m.log.filter((l) => /reply dropped/.test(l))).toHaveLength(1);
    expect(m.proc.exitCode).toBeNull();
  });
});
