// Local live migration (`vtpm qemu attach --incoming`): a destination endpoint for a VM whose vTPM
// another endpoint serves. The destination takes QEMU's post_load blobs while the source still serves;
// its INIT hands the vTPM over (the source is fenced: errors, then closed); a destination that never
// runs changes nothing. On the wire with a QEMU-style client, then with two real QEMUs on one host
// (migrate -d tcp:…), a guest extending PCR16 every second, and a failed attempt first.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import { CtrlClient, DataClient, Qemu, TPM2, TestHost, buildInitramfs, guestReport, pcr16After, vtpm } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('livemig');
let host: TestHost;
const qemus: Qemu[] = [];

beforeAll(async () => {
  host = await TestHost.up(work);
});

afterAll(async () => {
  await Promise.all(qemus.map((q) => q.quit()));
  await host?.down();
  removeDir(work);
});

/** Connect as QEMU does (SET_DATAFD on a fresh control connection). */
async function connectQemuStyle(ctrl: string): Promise<{ c: CtrlClient; d: DataClient }> {
  const c = await CtrlClient.connect(ctrl);
  const [mine, theirs] = socketPair();
  sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]);
  closeFd(theirs);
  expect((await c.read(4)).toString('hex')).toBe('00000000');
  return { c, d: new DataClient(mine) };
}

const FATAL = '80010000000a00000101'; // TPM_RC_FAILURE: the TPM is off (QEMU's version probe)
// PCR_Read response with any pcrUpdateCounter (bytes 10..13).
const pcrRead = (digest: string) => new RegExp(`^80010000003e00000000[0-9a-f]{8}00000001000b0300000100000001 0020${digest}$`.replace(/\s/g, ''), 'i');

/** GET_STATEBLOB (decrypted) of a type as QEMU's pre_save asks; returns the whole 16-byte header + blob. */
async function getBlob(c: CtrlClient, type: number): Promise<Buffer> {
  c.write(`0000000c 00000001 ${type.toString(16).padStart(8, '0')} 00000000`);
  const head = await c.read(16);
  expect(head.readUInt32BE(0)).toBe(0);
  return c.read(head.readUInt32BE(12));
}

function setBlobMsg(type: number, blob: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(0x0d, 0);
  h.writeUInt32BE(type, 8);
  h.writeUInt32BE(blob.length, 12);
  return Buffer.concat([h, blob]);
}

describe('vtpm qemu attach --incoming on the wire', () => {
  it('the source serves until the destination INITs; then the source answers errors and closes, the destination goes on from the blobs', async () => {
    const vm = randomUUID();
    const ctrlA = join(work, 'a.sock');
    const ctrlB = join(work, 'b.sock');
    await expect(host.attachIncoming(vm, ctrlB)).rejects.toThrow(/no QEMU vTPM to migrate from/);
    await host.attach(vm, ctrlA);
    const a = await connectQemuStyle(ctrlA);
    expect(await a.c.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await a.d.transmit(TPM2.startupClear)).toBe('80010000000a00000000');

    expect(await host.attachIncoming(vm, ctrlB)).toMatch(/incoming endpoint listening/);
    await expect(host.attachIncoming(vm, join(work, 'c.sock'))).rejects.toThrow(/already has an incoming QEMU vTPM/);
    await expect(host.attach(vm, join(work, 'c.sock'))).rejects.toThrow(/already has (a|an incoming) QEMU vTPM/);

    // The destination QEMU starts: its probe finds a TPM that is off; realize and reset as QEMU does.
    const b = await connectQemuStyle(ctrlB);
    expect(await b.d.transmit('8001 0000000a 00000181')).toBe(FATAL);
    expect(await b.c.cmd('00000001', 8)).toBe('0000000000007fef');
    expect(await b.c.cmd('0000000e', 4)).toBe('00000000');
    expect(await b.c.cmd('00000011 00001000', 16)).toBe('000000000000100000000af800001000');

    // The source still serves while the destination is up.
    expect(await a.d.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    const pcr = pcr16After(1);
    expect(await a.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr));

    // pre_save on the source, post_load on the destination.
    const perm = await getBlob(a.c, 1);
    const vol = await getBlob(a.c, 2);
    expect(await b.c.cmd('0000000e', 4)).toBe('00000000');
    b.c.write(setBlobMsg(1, perm));
    expect((await b.c.read(4)).toString('hex')).toBe('00000000');
    b.c.write(setBlobMsg(2, vol));
    expect((await b.c.read(4)).toString('hex')).toBe('00000000');
    // Until the destination runs, the vTPM is the source's.
    expect(await a.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr));
    expect(await b.d.transmit(TPM2.pcrRead16)).toBe(FATAL);

    // The destination's INIT (with DELETE_VOLATILE, as post_load sends it) is the hand-over.
    expect(await b.c.cmd('00000002 00000001', 4)).toBe('00000000');
    expect(await b.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr));
    expect(await b.d.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    expect(await b.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr16After(2)));

    // The source: its data channel is gone, control answers nothing but an error, then closes.
    await expect(a.d.transmit(TPM2.pcrRead16, 2000)).rejects.toThrow();
    const after = await a.c.cmd('00000001', 8, 2000);
    expect(['', '00000009']).toContain(after);
    await a.c.read(1, 2000);
    expect(a.c.closed).toBe(true);
    expect(fs.existsSync(ctrlA)).toBe(false);
    expect(host.backendLog()).toMatch(/taken over from node/);

    // The VM has one serving endpoint again: a new migration may start from it; detach --vm takes both nodes.
    const out = (await vtpm('qemu', 'detach', '--run', host.run, '--vm', vm)).stdout;
    expect(out).toMatch(/nodes \d+, \d+ detached/);
    a.c.close();
    b.c.close();
    b.d.close();
  });

  it('a destination that INITs without migrated state is refused and the source goes on; detaching it changes nothing', async () => {
    const vm = randomUUID();
    const ctrlA = join(work, 'a2.sock');
    const ctrlB = join(work, 'b2.sock');
    await host.attach(vm, ctrlA);
    const a = await connectQemuStyle(ctrlA);
    expect(await a.c.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await a.d.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    expect(await a.d.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    await host.attachIncoming(vm, ctrlB);
    const b = await connectQemuStyle(ctrlB);
    expect(await b.c.cmd('00000002 00000000', 4)).toBe('00000009');
    expect(host.backendLog()).toMatch(/starts only from migrated state/);
    expect(await a.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr16After(1)));
    b.c.close();
    b.d.close();
    await host.detachCtrl(ctrlB);
    expect(await a.d.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    expect(await a.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead(pcr16After(2)));
    a.c.close();
    a.d.close();
    await host.detach(vm);
  });
});

describe('vtpm qemu attach --incoming with a blob libtpms refuses', () => {
  it('INIT answers 0x09 and the vTPM goes back to its last durable state, powered off; the destination may INIT again from it', async () => {
    const vm = randomUUID();
    const ctrlA = join(work, 'a3.sock');
    const ctrlB = join(work, 'b3.sock');
    await host.attach(vm, ctrlA);
    const a = await connectQemuStyle(ctrlA);
    expect(await a.c.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await a.d.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    const perm = await getBlob(a.c, 1);
    await host.attachIncoming(vm, ctrlB);
    const b = await connectQemuStyle(ctrlB);
    expect(await b.c.cmd('0000000e', 4)).toBe('00000000');
    b.c.write(setBlobMsg(1, perm));
    expect((await b.c.read(4)).toString('hex')).toBe('00000000');
    // A well-formed version-1 header (totlen right) around bytes that are no volatile state.
    const junk = Buffer.alloc(10 + 64, 0x5a);
    junk.writeUInt8(1, 0);
    junk.writeUInt8(1, 1);
    junk.writeUInt16BE(10, 2);
    junk.writeUInt16BE(0, 4);
    junk.writeUInt32BE(junk.length, 6);
    b.c.write(setBlobMsg(2, junk));
    expect((await b.c.read(4)).toString('hex')).toBe('00000000');
    expect(await b.c.cmd('00000002 00000001', 4)).toBe('00000009');
    expect(host.backendLog()).toMatch(/refused the blob/);
    // The source was fenced at the hand-over; the destination owns a TPM that is off, on the durable state.
    await a.c.read(1, 2000);
    expect(a.c.closed).toBe(true);
    expect(await b.d.transmit(TPM2.pcrRead16)).toBe(FATAL);
    expect(await b.c.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await b.d.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    expect(await b.d.transmit(TPM2.pcrRead16)).toMatch(pcrRead('00'.repeat(32)));
    b.c.close();
    b.d.close();
    a.d.close();
    await host.detach(vm);
  });
});

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Every loop line shows PCR16 after (its number + 1) extends: nothing lost, nothing done twice. */
function expectChain(serial: string): number {
  const loops = guestReport(serial).loops;
  for (const l of loops) expect(l.pcr16, `loop ${l.n}`).toBe(pcr16After(l.n + 1));
  return loops.at(-1)?.n ?? 0;
}

describe('two real QEMUs on one host', () => {
  it('migrate -d tcp: a failed attempt (destination killed) leaves the source serving; the next one moves the vTPM and PCR16 goes on', async () => {
    const initrd = await buildInitramfs(work);
    const vm = randomUUID();
    const ctrlA = join(work, 'qa.sock');
    await host.attach(vm, ctrlA);
    const start = (name: string, ctrl: string, incoming?: string): Qemu => {
      const q = new Qemu({ name, dir: work, initrd, ctrl, device: 'tpm-tis', append: 'e2e_extend_loop', ...(incoming ? { incoming } : {}) });
      qemus.push(q);
      return q;
    };
    const src = start('src', ctrlA);
    await src.waitSerial(/^E2E-LOOP 2 /m);
    expectChain(src.serialText());

    // Attempt 1: the destination dies while the migration runs.
    const ctrlX = join(work, 'qx.sock');
    await host.attachIncoming(vm, ctrlX);
    const portX = await freePort();
    const dead = start('dead', ctrlX, `tcp:127.0.0.1:${portX}`);
    await dead.hmp('info status');
    await src.hmp(`migrate -d tcp:127.0.0.1:${portX}`);
    dead.proc.kill('SIGKILL');
    await expect(src.waitMigration(60_000)).rejects.toThrow(/failed|cancelled/);
    await host.detachCtrl(ctrlX);
    const n0 = expectChain(src.serialText());
    await src.waitSerial(new RegExp(`^E2E-LOOP ${n0 + 2} `, 'm'));
    expectChain(src.serialText());

    // Attempt 2: live, to a destination that runs; its INIT takes the vTPM over.
    const ctrlB = join(work, 'qb.sock');
    await host.attachIncoming(vm, ctrlB);
    const portB = await freePort();
    const dst = start('dst', ctrlB, `tcp:127.0.0.1:${portB}`);
    await dst.hmp('info status');
    await src.hmp(`migrate -d tcp:127.0.0.1:${portB}`);
    await src.waitMigration(90_000);
    const lastOnSrc = expectChain(src.serialText());
    await dst.waitSerial(new RegExp(`^E2E-LOOP ${lastOnSrc + 2} `, 'm'));
    const onDst = guestReport(dst.serialText());
    // No second boot: the loop continues the source's counter with the source's PCR16 chain.
    expect(onDst.version).toBe('');
    expect(onDst.loops[0]!.n).toBe(lastOnSrc + 1);
    expectChain(dst.serialText());
    // The source endpoint is gone; the source QEMU can only quit.
    expect(fs.existsSync(ctrlA)).toBe(false);
    expect(await src.hmp('info status')).toMatch(/postmigrate/);
    await src.quit();
    await dst.waitSerial(new RegExp(`^E2E-LOOP ${lastOnSrc + 3} `, 'm'));
    expectChain(dst.serialText());
    await dst.quit();
    await host.detach(vm);
  });
});
