// The QEMU data channel under a peer that pipelines commands and stops reading: the backend holds at
// most one command of its input and waits for each response to be taken, so the peer's backlog stays
// in the peer, the backend's memory stays flat, and the VM next door is served meanwhile. Once the
// peer reads again every command is answered, in order. A control client that floods requests without
// reading its replies is cut off alone, with one log line.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import { CtrlClient, TestHost } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qbp');
const ctrl = join(work, 'ctrl.sock');
const ctrl2 = join(work, 'ctrl2.sock');
let host: TestHost;

beforeAll(async () => {
  host = await TestHost.up(work);
  await host.attach(randomUUID(), ctrl);
  await host.attach(randomUUID(), ctrl2);
});

afterAll(async () => {
  await host?.down();
  removeDir(work);
});

function backendRssMiB(): number {
  const h = JSON.parse(fs.readFileSync(join(host.run, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
  const pid = h.processes.find((p) => p.role === 'backend')!.pid;
  return Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
}

/** Responses framed by their header size, as they arrive. */
class Responses {
  readonly list: Buffer[] = [];
  #buf = Buffer.alloc(0);
  push(d: Buffer): void {
    this.#buf = Buffer.concat([this.#buf, d]);
    while (this.#buf.length >= 10 && this.#buf.length >= this.#buf.readUInt32BE(2)) {
      const n = this.#buf.readUInt32BE(2);
      this.list.push(Buffer.from(this.#buf.subarray(0, n)));
      this.#buf = this.#buf.subarray(n);
    }
  }
  async until(n: number, timeoutMs: number): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (this.list.length < n) {
      if (Date.now() > end) throw new Error(`have ${this.list.length} of ${n} responses`);
      await sleep(20);
    }
  }
}

async function openData(path: string): Promise<{ c: CtrlClient; peer: net.Socket; rsp: Responses }> {
  const c = await CtrlClient.connect(path);
  const [mine, theirs] = socketPair();
  sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]);
  closeFd(theirs);
  expect((await c.read(4)).toString('hex')).toBe('00000000');
  expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // INIT
  const peer = new net.Socket({ fd: mine, readable: true, writable: true });
  const rsp = new Responses();
  peer.on('data', (d: Buffer) => rsp.push(d));
  peer.on('error', () => {});
  peer.write(tpm2.startup());
  await rsp.until(1, 10_000);
  expect(rsp.list[0]!.toString('hex')).toBe('80010000000a00000000');
  rsp.list.length = 0;
  return { c, peer, rsp };
}

describe('QEMU data channel backpressure', () => {
  it('keeps a pipelining peer that stops reading in its own buffers; answers everything once it reads', async () => {
    const { c, peer, rsp } = await openData(ctrl);
    peer.pause();
    // GetCapability(TPM_CAP_COMMANDS, all): a few hundred bytes each, enough to fill the socket.
    const getCap = Buffer.from('8001000000160000017a000000020000011f00000100', 'hex');
    // Then 4000 well-sized 1024-byte commands (GetRandom with trailing bytes: a 10-byte error each).
    const junk = Buffer.alloc(1024);
    Buffer.from('80010000040000000' + '17b', 'hex').copy(junk);
    const flood = Buffer.concat([...Array.from({ length: 1000 }, () => getCap), ...Array.from({ length: 4000 }, () => junk)]);
    const rss0 = backendRssMiB();
    peer.write(flood);
    await sleep(1500);
    // the backend stopped taking input: most of the 4 MiB still waits on the peer's side
    expect(peer.writableLength).toBeGreaterThan(2 * 1024 * 1024);
    // the endpoint's control channel and the other VM's vTPM answer meanwhile
    expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
    const other = await openData(ctrl2);
    other.peer.write(Buffer.from('8001000000160000017a000000020000011f00000100', 'hex'));
    await other.rsp.until(1, 5000);
    expect(other.rsp.list[0]!.readUInt32BE(6)).toBe(0);
    expect(backendRssMiB() - rss0).toBeLessThan(64);
    peer.resume();
    await rsp.until(5000, 120_000);
    expect(rsp.list.slice(0, 1000).every((r) => r.readUInt16BE(0) === 0x8001 && r.readUInt32BE(6) === 0 && r.length > 100)).toBe(true);
    expect(rsp.list.slice(1000).every((r) => r.length === 10 && r.readUInt32BE(6) !== 0)).toBe(true);
    peer.destroy();
    other.peer.destroy();
    c.close();
    other.c.close();
  }, 180_000);

  it('cuts off a control client that floods requests without reading its replies; others go on', async () => {
    const c = await CtrlClient.connect(ctrl);
    expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // INIT
    c.sock.pause();
    // GET_STATEBLOB(volatile), one message a write: every reply carries the whole ~9 KB blob.
    const req = Buffer.from('0000000c000000000000000200000000', 'hex');
    for (let i = 0; i < 600 && !c.closed; i++) {
      c.write(req);
      await sleep(2);
    }
    const end = Date.now() + 30_000;
    while (!/control client cut off/.test(host.backendLog()) && Date.now() < end) await sleep(100);
    expect(host.backendLog()).toMatch(/qemu \d+: control client cut off: (64 requests unanswered and more arriving|\d+ reply bytes unread)/);
    c.sock.resume();
    const d = await CtrlClient.connect(ctrl);
    expect(await d.cmd('00000001', 8)).toBe('0000000000007fef');
    d.close();
    c.close();
  }, 60_000);
});
