// The XenStore daemon's capture feed (src/xenstore/capture-feed.ts, docs/observability.md) on a real
// `vtpm xenstored` process: the record bytes a subscriber gets for a guest's own traffic, a malformed
// subscriber cut off alone, the socket owner-only, and dom0's client (capture-feed-client.ts).
import { afterAll, beforeAll, expect, it } from 'vitest';
import fs from 'node:fs';
import net from 'node:net';
import { XsType, encodeMessage, encodeStrings } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { captureFeedPath } from '../../src/xenstore/capture-feed.js';
import { CaptureFeedClient } from '../../src/xenstore/capture-feed-client.js';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { MAIN, RawConn, connectClient, hex, startDaemon, type Daemon } from './helpers.js';
import { tempDir, removeDir } from '../helpers/temp.js';

let d: Daemon;
let c: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  c = await connectClient(d.socket);
  await c.introduce(5);
  await c.introduce(6);
});
afterAll(async () => {
  await c?.close();
  await d?.stop();
});

/** A subscriber that speaks bytes. */
async function subscriber(): Promise<{ s: net.Socket; bytes: () => Buffer; waitBytes: (n: number) => Promise<Buffer>; closed: () => boolean }> {
  const s = net.createConnection(captureFeedPath(d.socket));
  await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
  const chunks: Buffer[] = [];
  let closed = false;
  s.on('data', (b: Buffer) => chunks.push(b));
  s.on('close', () => (closed = true));
  s.on('error', () => {});
  const bytes = (): Buffer => Buffer.concat(chunks);
  const waitBytes = async (n: number): Promise<Buffer> => {
    for (let i = 0; i < 250 && bytes().length < n && !closed; i++) await new Promise((r) => setTimeout(r, 20));
    return bytes();
  };
  return { s, bytes, waitBytes, closed: () => closed };
}

it('is a socket beside the dom0 socket, owner-only like it', () => {
  expect(fs.statSync(captureFeedPath(d.socket)).mode & 0o777).toBe(0o600);
});

it('acknowledges a subscription, then sends each packet of the guest\'s connection and each reply, byte for byte, with domid, direction and time', async () => {
  const sub = await subscriber();
  const t0 = Date.now() * 1000;
  sub.s.write(Buffer.from('01000500', 'hex')); // CAPTURE dom5
  const ack = await sub.waitBytes(16);
  // length 12, domid 5, kind 2 (subscribed), 0, time 0 (an acknowledgement has none)
  expect(hex(ack.subarray(0, 16))).toBe('0c000000' + '0500' + '02' + '00' + '0000000000000000');
  const guest = await RawConn.connect(d.domSocket(5));
  const request = encodeMessage(XsType.WRITE, 7, 0, Buffer.from('data/k\0hi'));
  guest.send(request);
  const [reply] = await guest.waitMessages(1);
  expect(reply!.type).toBe(XsType.WRITE);
  const b = await sub.waitBytes(16 + 16 + request.length + 16 + 16 + 3);
  // The guest's request: length 12 + 25, domid 5, kind 1 (from the guest), 0, time, the packet.
  const r1 = b.subarray(16, 32 + request.length);
  expect(hex(r1.subarray(0, 8))).toBe(Buffer.from(Uint32Array.of(12 + request.length).buffer).toString('hex') + '0500' + '01' + '00');
  const micros = r1.readUInt32LE(12) * 2 ** 32 + r1.readUInt32LE(8);
  expect(micros).toBeGreaterThanOrEqual(t0 - 1000);
  expect(micros).toBeLessThanOrEqual(Date.now() * 1000 + 1000);
  expect(hex(r1.subarray(16))).toBe(hex(request));
  // xenstored's reply: kind 0 (to the guest), the bytes the guest received.
  const r2 = b.subarray(32 + request.length);
  expect(hex(r2.subarray(4, 8))).toBe('0500' + '00' + '00');
  expect(hex(r2.subarray(16))).toBe(hex(guest.allBytes()));
  // Another domain's traffic is not sent.
  const other = await RawConn.connect(d.domSocket(6));
  other.send(encodeMessage(XsType.READ, 1, 0, encodeStrings('/local/domain/6')));
  await other.waitMessages(1);
  // STOP dom5: nothing more of it either.
  sub.s.write(Buffer.from('02000500', 'hex'));
  await new Promise((r) => setTimeout(r, 100));
  guest.send(encodeMessage(XsType.READ, 8, 0, encodeStrings('data/k')));
  await guest.waitMessages(2);
  await new Promise((r) => setTimeout(r, 100));
  expect(sub.bytes().length).toBe(b.length);
  guest.close();
  other.close();
  sub.s.destroy();
});

it('closes a subscriber that sends a malformed request, alone: another subscriber and the guest carry on', async () => {
  const good = await subscriber();
  good.s.write(Buffer.from('01000500', 'hex'));
  await good.waitBytes(16);
  const bad = await subscriber();
  bad.s.write(Buffer.from('09000500', 'hex')); // no such op
  for (let i = 0; i < 100 && !bad.closed(); i++) await new Promise((r) => setTimeout(r, 20));
  expect(bad.closed()).toBe(true);
  const guest = await RawConn.connect(d.domSocket(5));
  guest.send(encodeMessage(XsType.READ, 1, 0, encodeStrings('data/k')));
  const [m] = await guest.waitMessages(1);
  expect(m!.payload.toString()).toBe('hi');
  const b = await good.waitBytes(16 + 2 * 16 + 16 + 7 + 16 + 2);
  expect(b.length).toBe(16 + (16 + 16 + 7) + (16 + 16 + 2));
  expect(d.stderr() + '').not.toMatch(/internal error/);
  guest.close();
  good.s.destroy();
});

it('dom0\'s client: add() resolves once the guest is tapped; its listener gets the guest\'s writes; remove() ends them', async () => {
  const feed = new CaptureFeedClient(d.socket, () => {});
  const got: Array<{ fromGuest: boolean; type: number; arg: string }> = [];
  await feed.add(6, (fromGuest, _micros, packet) => got.push({ fromGuest, type: packet.readUInt32LE(0), arg: packet.subarray(16).toString('latin1') }));
  const guest = await connectClient(d.domSocket(6));
  await guest.write('device/vtpm/0/state', '3');
  for (let i = 0; i < 100 && got.length < 2; i++) await new Promise((r) => setTimeout(r, 20));
  expect(got).toContainEqual({ fromGuest: true, type: XsType.WRITE, arg: 'device/vtpm/0/state\x003' });
  expect(got).toContainEqual({ fromGuest: false, type: XsType.WRITE, arg: 'OK\0' });
  feed.remove(6);
  const n = got.length;
  await guest.write('device/vtpm/0/state', '4');
  await new Promise((r) => setTimeout(r, 100));
  expect(got).toHaveLength(n);
  await guest.close();
});

it('dom0\'s client asks again after xenstored restarts, and the guest\'s new connection is captured', async () => {
  const dir = tempDir('xsfeed');
  const socket = join(dir, 'socket');
  const domDir = join(dir, 'domains');
  const start = async (): Promise<() => Promise<void>> => {
    const proc = spawn(process.execPath, [MAIN, 'xenstored', '--socket', socket, '--domain-socket-dir', domDir], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      let out = '';
      proc.stdout!.on('data', (b: Buffer) => (out += b.toString()).includes('listening') && resolve());
      proc.once('exit', (code) => reject(new Error(`xenstored exited ${code}`)));
    });
    return async () => {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await exited;
    };
  };
  let stop = await start();
  const feed = new CaptureFeedClient(socket, () => {});
  try {
    const got: string[] = [];
    const dom0 = await connectClient(socket);
    await dom0.introduce(7);
    await dom0.close();
    await feed.add(7, (fromGuest, _m, packet) => fromGuest && got.push(packet.subarray(16).toString('latin1')));
    await stop();
    stop = await start();
    const dom0b = await connectClient(socket);
    await dom0b.introduce(7);
    await dom0b.close();
    // The client reconnects within its retry interval; until then the guest's traffic is not seen.
    const guest = await connectClient(join(domDir, 'dom7.sock'));
    for (let i = 0; i < 100 && got.length === 0; i++) {
      await guest.write('device/vtpm/0/state', '1');
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(got).toContain('device/vtpm/0/state\x001');
    await guest.close();
  } finally {
    feed.close();
    await stop();
    removeDir(dir);
  }
});
