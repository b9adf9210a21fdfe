// The control protocol on the wire against a live endpoint (`vtpm host up` + `vtpm qemu attach`): the
// bytes QEMU 7.2 and swtpm_ioctl exchange with swtpm 0.7.1, every swtpm_ioctl option we claim, state
// blobs that real swtpm loads, and a second control client that hangs nobody (swtpm #415).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import { CtrlClient, DataClient, TPM2, TestHost, exec, vtpm } from './helpers.js';
import { SwtpmProcess } from '../../helpers/swtpm.js';
import { TpmClient } from '../../helpers/tpm-client.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('ctrl');
const vm = randomUUID();
const ctrl = join(work, 'ctrl.sock');
let host: TestHost;
const ioctl = (...args: string[]) => exec('swtpm_ioctl', ['--unix', ctrl, ...args]);
const pcr16 = createHash('sha256').update(Buffer.alloc(32)).update(Buffer.alloc(32, 0xaa)).digest('hex');
// PCR_Read response with any pcrUpdateCounter (bytes 10..13).
const pcrReadReply = (digest: string) =>
  new RegExp(`^80010000003e00000000[0-9a-f]{8}${'00000001 000b 03 000001 00000001 0020'.replace(/\s/g, '')}${digest}$`);

/** SET_DATAFD over a fresh connection, as QEMU does it; returns our end of the data channel. */
async function setDataFd(): Promise<{ reply: string; data: DataClient; c: CtrlClient }> {
  const c = await CtrlClient.connect(ctrl);
  const [mine, theirs] = socketPair();
  sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]);
  closeFd(theirs);
  const reply = (await c.read(4)).toString('hex');
  return { reply, data: new DataClient(mine), c };
}

beforeAll(async () => {
  host = await TestHost.up(work);
  await host.attach(vm, ctrl);
});

afterAll(async () => {
  await host?.down();
  removeDir(work);
});

describe('vtpm qemu attach/detach', () => {
  it('refuses a second endpoint for the same VM or socket, a live or non-socket path, and detaching an unknown VM', async () => {
    await expect(host.attach(vm, join(work, 'other.sock'))).rejects.toThrow(/already has a QEMU vTPM/);
    await expect(host.attach(randomUUID(), ctrl)).rejects.toThrow(/already served/);
    await expect(host.detach(randomUUID())).rejects.toThrow(/no QEMU vTPM/);
    expect(fs.existsSync(join(work, 'other.sock'))).toBe(false);
    // A socket someone else listens on is not taken over; a dead one is replaced.
    const { createServer } = await import('node:net');
    const busy = join(work, 'busy.sock');
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(busy, r));
    await expect(host.attach(randomUUID(), busy)).rejects.toThrow(/in use/);
    await new Promise<void>((r) => srv.close(() => r()));
    fs.writeFileSync(join(work, 'plain-file'), '');
    await expect(host.attach(randomUUID(), join(work, 'plain-file'))).rejects.toThrow(/not a socket/);
  });

  it('detach closes the socket and re-attach serves the same VM again', async () => {
    const vm2 = randomUUID();
    const sock = join(work, 'again.sock');
    await host.attach(vm2, sock);
    await host.detach(vm2);
    expect(fs.existsSync(sock)).toBe(false);
    await host.attach(vm2, sock);
    const c = await CtrlClient.connect(sock);
    expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
    // Detach by socket path works too, and ends the connected client.
    expect((await vtpm('qemu', 'detach', '--run', host.run, '--ctrl', sock)).stdout).toMatch(/detached/);
    await c.read(1, 1000);
    expect(c.closed).toBe(true);
    expect(fs.existsSync(sock)).toBe(false);
  });
});

describe("the VM's vTPM is the same manager-backed instance a ring guest gets", () => {
  it('an NV index written by tpm2-tools through a ring guest is read back by a QEMU-style client', async () => {
    const vm3 = randomUUID();
    const port = await freePortPair();
    await vtpm('guest', 'attach', '--run', host.run, '--domid', '7', '--vm', vm3, '--protocol', 'ring', '--tcti-port', String(port));
    const env = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` };
    const nvIn = join(work, 'nv.in');
    fs.writeFileSync(nvIn, 'from-a-ring-guest');
    await exec('tpm2_startup', ['-c'], { env });
    await exec('tpm2_nvdefine', ['-Q', '0x1500016', '-C', 'o', '-s', '32', '-a', 'ownerread|ownerwrite|authread|authwrite'], { env });
    await exec('tpm2_nvwrite', ['-Q', '0x1500016', '-C', 'o', '-i', nvIn], { env });
    await vtpm('guest', 'detach', '--run', host.run, '--domid', '7');
    const sock = join(work, 'shared.sock');
    await host.attach(vm3, sock);
    const c3 = await CtrlClient.connect(sock);
    const [mine, theirs] = socketPair();
    sendWithFds(c3.fd, Buffer.from('00000010', 'hex'), [theirs]);
    closeFd(theirs);
    expect((await c3.read(4)).toString('hex')).toBe('00000000');
    const d3 = new DataClient(mine);
    expect(await c3.cmd('00000002 00000000', 4)).toBe('00000000');
    expect(await d3.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    // TPM2_NV_Read(auth owner, index 0x01500016, size 17, offset 0) with an empty password session.
    const r = await d3.transmit('8002 00000023 0000014e 40000001 01500016 00000009 40000009 0000 01 0000 0011 0000');
    // header, parameterSize, TPM2B_MAX_NV_BUFFER {0x0011, data}, password session response.
    expect(r.slice(0, 32)).toBe('80020000002600000000' + '00000013' + '0011');
    expect(Buffer.from(r.slice(32, 32 + 34), 'hex').toString()).toBe('from-a-ring-guest');
    expect(r.slice(66)).toBe('0000010000');
    d3.close();
    c3.close();
    await host.detach(vm3);
  });
});

describe('swtpm control protocol on our endpoint', () => {
  it('answers GET_CAPABILITY with 8 bytes carrying every bit QEMU 7.2 needs for TPM 2 and migration', async () => {
    const c = await CtrlClient.connect(ctrl);
    const r = await c.cmd('00000001', 8);
    expect(r).toBe('0000000000007fef');
    const caps = parseInt(r.slice(8), 16);
    expect(caps & 0x348f).toBe(0x348f);
    expect(caps & 0x0700).toBe(0x0700);
    // Unknown command: swtpm's 4-byte TPM_BAD_ORDINAL (test_ctrlchannel uses 0x0000FFFF).
    expect(await c.cmd('0000ffff', 4)).toBe('0000000a');
    // Commands that need a running TPM, before INIT: 4-byte 0x0A even where success is longer.
    expect(await c.cmd('00000004', 8, 300)).toBe('0000000a');
    c.close();
  });

  it("runs QEMU's device-creation and reset sequence with QEMU's exact reply sizes", async () => {
    const { reply, data, c } = await setDataFd();
    expect(reply).toBe('00000000');
    // QEMU's version probe before INIT: TPM2_ReadClock gets TPM_RC_FAILURE, as from swtpm.
    expect(await data.transmit('8001 0000000a 00000181')).toBe('80010000000a00000101');
    expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
    expect(await c.cmd('0000000e', 4)).toBe('00000000'); // STOP
    expect(await c.cmd('00000011 00000000', 16)).toBe('00000000000010000000' + '0af800001000'); // SET_BUFFERSIZE query
    expect(await c.cmd('0000000e', 4)).toBe('00000000');
    expect(await c.cmd('00000011 00000f80', 16)).toBe('0000000000000f80' + '00000af800001000'); // tpm-crb's size
    expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // INIT
    expect(await c.cmd('00000004', 8)).toBe('0000000000000000'); // GET_TPMESTABLISHED
    expect(await c.cmd('00000005 00000000', 4)).toBe('00000000'); // SET_LOCALITY 0 (QEMU's 4 bytes)
    expect(await c.cmd('00000011 00001000', 4)).toBe('0000000a'); // no buffer size change while running
    expect(await c.cmd('00000005 05', 4)).toBe('0000003d'); // locality 5
    expect(await c.cmd('0000000b 05', 4)).toBe('0000003d'); // RESET_TPMESTABLISHED at locality 5
    expect(await c.cmd('0000000b 03000000', 4)).toBe('00000000');
    expect(await c.cmd('00000009', 4)).toBe('00000000'); // CANCEL_TPM_CMD with nothing running
    expect(await c.cmd('0000000f', 8)).toBe('0000000000000000'); // GET_CONFIG: no keys
    expect(await data.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    expect(await data.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    expect(await data.transmit(TPM2.pcrRead16)).toMatch(pcrReadReply(pcr16));
    // QEMU's pre_save: three GET_STATEBLOBs with DECRYPTED; header (result, flags, totlength, length) + blob.
    c.write('0000000c 00000001 00000001 00000000');
    const hdr = await c.read(16);
    expect(hdr.readUInt32BE(0)).toBe(0);
    expect(hdr.readUInt32BE(4)).toBe(0);
    const len = hdr.readUInt32BE(8);
    expect(hdr.readUInt32BE(12)).toBe(len);
    const perm = await c.read(len);
    expect(perm.subarray(0, 6).toString('hex')).toBe('0201000a0004');
    expect(perm.readUInt32BE(6)).toBe(len);
    c.write('0000000c 00000001 00000002 00000000');
    const vhdr = await c.read(16);
    expect(vhdr.readUInt32BE(0)).toBe(0);
    await c.read(vhdr.readUInt32BE(8));
    // No savestate: TPM_RETRY (0x800) and zero lengths, still the 16-byte header.
    expect(await c.cmd('0000000c 00000001 00000003 00000000', 16)).toBe('00000800' + '0'.repeat(24));
    // A second SET_DATAFD while the first channel lives: TPM_IOERROR.
    const second = await setDataFd();
    expect(second.reply).toBe('0000001f');
    second.c.close();
    // SHUTDOWN powers off and drops the data channel; the endpoint stays for the next QEMU.
    expect(await c.cmd('00000003', 4)).toBe('00000000');
    await sleep(100);
    expect(data.sock.destroyed || data.sock.readableEnded).toBe(true);
    c.close();
    data.close();
  });

  it('works with every swtpm_ioctl option: -c -i -g -v --info --save/--load --stop -s', async () => {
    expect((await ioctl('-c')).stdout).toContain('ptm capability is 0x7fef');
    await ioctl('-i');
    expect((await ioctl('-g')).stdout).toContain('ptm configuration flags: 0x0');
    await ioctl('-v');
    expect(JSON.parse((await ioctl('--info', '1')).stdout)).toEqual({ TPMSpecification: { family: '2.0', level: 0, revision: 164 } });
    expect(JSON.parse((await ioctl('--info', '2')).stdout).TPMAttributes).toBeTruthy();
    // Extend PCR16 through a data channel, save both blobs with swtpm_ioctl, stop, load them back.
    const { data, c, reply } = await setDataFd();
    expect(reply).toBe('00000000');
    expect(await data.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    expect(await data.transmit(TPM2.extend16)).toBe('80020000001300000000000000000000010000');
    const perm = join(work, 'perm.blob');
    const vol = join(work, 'vol.blob');
    await ioctl('--save', 'permanent', perm);
    await ioctl('--save', 'volatile', vol);
    for (const f of [perm, vol]) {
      const b = fs.readFileSync(f);
      expect(b.subarray(0, 6).toString('hex')).toBe('0201000a0004');
      expect(b.readUInt32BE(6)).toBe(b.length);
    }
    await ioctl('--stop');
    expect(await c.cmd('00000004', 8, 300)).toBe('0000000a'); // stopped: not running
    await ioctl('--load', 'permanent', perm);
    await ioctl('--load', 'volatile', vol);
    await ioctl('-i');
    expect(await data.transmit(TPM2.pcrRead16)).toMatch(pcrReadReply(pcr16));
    await expect(ioctl('--load', 'volatile', vol)).rejects.toThrow(); // not while running
    await ioctl('-s');
    expect(await c.cmd('00000004', 8, 300)).toBe('0000000a');
    c.close();
    data.close();

    // The same blob files load into real swtpm 0.7.1, which then reads the same PCR16.
    const sdir = join(work, 'swtpm');
    const sctrl = join(sdir, 'ctrl.sock');
    const sdata = join(sdir, 'data.sock');
    const sw = await SwtpmProcess.start({ stateDir: sdir, transport: 'unix', ctrlPath: sctrl, dataPath: sdata });
    try {
      await exec('swtpm_ioctl', ['--unix', sctrl, '--stop']);
      await exec('swtpm_ioctl', ['--unix', sctrl, '--load', 'permanent', perm]);
      await exec('swtpm_ioctl', ['--unix', sctrl, '--load', 'volatile', vol]);
      await exec('swtpm_ioctl', ['--unix', sctrl, '-i']);
      const tpm = await TpmClient.connect({ path: sdata });
      const got = await tpm.transmitHex(TPM2.pcrRead16);
      tpm.close();
      expect(got).toMatch(pcrReadReply(pcr16));
    } finally {
      await sw.stop();
    }
  });

  it('serves a second control client while the first stays connected mid-command (swtpm #415)', async () => {
    const first = await CtrlClient.connect(ctrl);
    first.write('0000'); // half a command code, left hanging
    const t0 = Date.now();
    expect((await ioctl('-c')).stdout).toContain('0x7fef');
    const second = await CtrlClient.connect(ctrl);
    expect(await second.cmd('00000001', 8)).toBe('0000000000007fef');
    expect(Date.now() - t0).toBeLessThan(2000);
    // The first one is hung up on once the 500 ms deadline passes, as swtpm 0.7.1 does.
    expect((await first.read(4)).length).toBe(0);
    expect(first.closed).toBe(true);
    second.close();
  });
});
