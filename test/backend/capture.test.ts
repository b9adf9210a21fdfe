// A guest's capture (src/backend/capture.ts, docs/observability.md): a command's records are encoded
// once its answer is published, in that same call (never on a later turn of the loop, which on a
// polling backend runs after the guest's next command was seen), and its TCP segments carry the bytes
// the doc's table names, read back by tshark with IPv4 checksum validation on.
import { afterAll, afterEach, expect, it, vi } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { GuestCapture, RingEvent } from '../../src/backend/capture.js';
import { PcapngWriter } from '../../src/util/pcapng.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const run = promisify(execFile);
const work = tempDir('capture');
afterAll(() => removeDir(work));
afterEach(() => vi.restoreAllMocks());

const GET_RANDOM_8 = Uint8Array.from([0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8]);
const RESPONSE = Uint8Array.from([0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);

it('encodes a v2 SUBMIT, its command and response inside the FINISH tap, after the answer is published, and schedules nothing for later', async () => {
  const begin = vi.spyOn(PcapngWriter.prototype, 'begin');
  const immediate = vi.spyOn(globalThis, 'setImmediate');
  const c = new GuestCapture(join(work, 'v2.pcapng'), 1 << 20, 7, 0, () => {});
  c.newStream();
  c.ring(RingEvent.V2_SUBMIT, 0, 0, 12);
  const t0 = performance.now();
  // The first command teaches the capture that this channel taps FINISH; from then on nothing is deferred.
  c.command(GET_RANDOM_8, RESPONSE, t0);
  c.ring(RingEvent.V2_FINISH, 0, 0, RESPONSE.length);
  const interfaces = (): number[] => begin.mock.calls.map((a) => a[0]);
  // SYN, SYN-ACK, ACK, then at FINISH: SUBMIT, command, response, FINISH.
  expect(interfaces()).toEqual([0, 0, 0, 1, 0, 0, 1]);
  immediate.mockClear();
  c.ring(RingEvent.V2_SUBMIT, 0, 0, 12);
  c.command(GET_RANDOM_8, RESPONSE, performance.now());
  // Submitted and answered but not yet published: nothing encoded, not even the SUBMIT (it would delay the answer).
  expect(interfaces()).toHaveLength(7);
  c.ring(RingEvent.V2_FINISH, 0, 0, RESPONSE.length);
  expect(interfaces()).toHaveLength(11);
  expect(immediate).not.toHaveBeenCalled();
  await c.close();
});

it('a transport without publication taps (a QEMU endpoint) gets its commands encoded on the next turn of the loop', async () => {
  const file = join(work, 'qemu.pcapng');
  const c = new GuestCapture(file, 1 << 20, 0, 3, () => {});
  const begin = vi.spyOn(PcapngWriter.prototype, 'begin');
  c.command(GET_RANDOM_8, RESPONSE, performance.now());
  expect(begin).not.toHaveBeenCalled();
  await new Promise((r) => setImmediate(r));
  // The stream opened (3 segments), then the command and the response.
  expect(begin).toHaveBeenCalledTimes(5);
  await c.close();
});

it('writes each TCP segment as the doc says: IPv4 header with its checksum, ports 49152/2321, sequence numbers, TCP checksum zero; tshark validates the IPv4 checksum', async () => {
  const file = join(work, 'bytes.pcapng');
  const c = new GuestCapture(file, 1 << 20, 0x0102, 0, () => {});
  c.newStream();
  c.ring(RingEvent.V2_SUBMIT, 0, 0, 12);
  c.command(GET_RANDOM_8, RESPONSE, performance.now());
  c.ring(RingEvent.V2_FINISH, 0, 0, RESPONSE.length);
  await c.close();
  const b = fs.readFileSync(file);
  // Walk the blocks: SHB (28), two IDBs (20 each), then EPBs; keep the interface-0 packets' data.
  const packets: Buffer[] = [];
  for (let o = 68; o < b.length; o += b.readUInt32LE(o + 4)) {
    expect(b.readUInt32LE(o)).toBe(6);
    if (b.readUInt32LE(o + 8) === 0) packets.push(b.subarray(o + 28, o + 28 + b.readUInt32LE(o + 20)));
  }
  // SYN, SYN-ACK, ACK, the command, the response.
  expect(packets).toHaveLength(5);
  const cmd = packets[3]!;
  const hex = (x: Buffer, from: number, to: number): string => x.subarray(from, to).toString('hex');
  // IPv4: version/IHL 45, TOS 0, total length 52, id 0, flags/fragment 0, TTL 64, TCP, checksum, 10.1.2.2 -> 10.1.2.1.
  expect(hex(cmd, 0, 10)).toBe('4500' + '0034' + '0000' + '0000' + '40' + '06');
  expect(hex(cmd, 12, 20)).toBe('0a010202' + '0a010201');
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += cmd.readUInt16BE(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  expect(sum).toBe(0xffff); // a header with a correct checksum sums to all ones
  // TCP: 49152 -> 2321, seq 1000 (after the SYN's 999), ack 5000, offset 5 words, PSH|ACK, window 65535, checksum 0, urgent 0.
  expect(hex(cmd, 20, 40)).toBe('c000' + '0911' + '000003e8' + '00001388' + '50' + '18' + 'ffff' + '0000' + '0000');
  expect(hex(cmd, 40, 52)).toBe(Buffer.from(GET_RANDOM_8).toString('hex'));
  const rsp = packets[4]!;
  expect(hex(rsp, 12, 20)).toBe('0a010201' + '0a010202');
  expect(hex(rsp, 20, 32)).toBe('0911' + 'c000' + '00001388' + '000003f4'); // ack = 1000 + 12
  // tshark, told to check IPv4 checksums, finds every one good (status 1) and decodes the TPM command.
  const { stdout } = await run('tshark', ['-o', 'ip.check_checksum:TRUE', '-r', file, '-Y', 'ip', '-T', 'fields', '-e', 'ip.checksum.status', '-e', 'tpm.req.cc']);
  const rows = stdout.trim().split('\n').map((l) => l.split('\t'));
  expect(rows.map((r) => r[0])).toEqual(['1', '1', '1', '1', '1']);
  expect(rows[3]![1]).toBe('0x0000017b');
});

it('a new connection relearns how its answers are published: after a v2 stream, a ring stream without notifications still gets its commands encoded', async () => {
  const c = new GuestCapture(join(work, 'switch.pcapng'), 1 << 20, 8, 0, () => {});
  c.newStream();
  c.ring(RingEvent.V2_SUBMIT, 0, 0, 12);
  c.command(GET_RANDOM_8, RESPONSE, performance.now());
  c.ring(RingEvent.V2_FINISH, 0, 0, RESPONSE.length);
  await new Promise((r) => setImmediate(r)); // (the first command's fallback, scheduled before FINISH taught otherwise)
  // Resumed on the ring transport, whose frontend polls: no NOTIFY_OUT follows its responses.
  c.newStream();
  const begin = vi.spyOn(PcapngWriter.prototype, 'begin');
  c.ring(RingEvent.REQUEST, 0, 1, 12, 1n);
  c.command(GET_RANDOM_8, RESPONSE, performance.now());
  c.ring(RingEvent.RESPONSE, 0, 0, RESPONSE.length, 1n);
  await new Promise((r) => setImmediate(r));
  // In the order they happened: REQUEST, the command and its response as TCP segments, RESPONSE.
  expect(begin.mock.calls.map((a) => a[0])).toEqual([1, 0, 0, 1]);
  await c.close();
});

it('a ring tap takes its fields as plain arguments and writes the 16-byte RING record the doc\'s table shows; the Lua dissector reads them back', async () => {
  const file = join(work, 'ring.pcapng');
  const c = new GuestCapture(file, 1 << 20, 0x0102, 3, () => {});
  c.newStream();
  c.ring(RingEvent.REQUEST, 2, 3, 300, 0x0102030405060708n);
  c.ring(RingEvent.RESPONSE, 1, 0, 0x10000, 0xfffffffffffffffen);
  c.ring(RingEvent.NOTIFY_OUT);
  await c.close();
  const b = fs.readFileSync(file);
  const records: string[] = [];
  for (let o = 68; o < b.length; o += b.readUInt32LE(o + 4)) {
    if (b.readUInt32LE(o + 8) === 1) records.push(b.subarray(o + 28, o + 28 + b.readUInt32LE(o + 20)).toString('hex'));
  }
  // version 1, kind 2, direction, 0, domid 0x0102, devid 3 | event, status or locality, segments, length, id.
  expect(records).toEqual([
    '01020100' + '0102' + '0003' + '02' + '02' + '0003' + '0000012c' + '0102030405060708',
    '01020000' + '0102' + '0003' + '03' + '01' + '0000' + '00010000' + 'fffffffffffffffe',
    '01020000' + '0102' + '0003' + '04' + '00' + '0000' + '00000000' + '0000000000000000',
  ]);
  const lua = join(import.meta.dirname, '..', '..', 'tools', 'wireshark', 'vtpm-split.lua');
  const { stdout } = await run('tshark', ['-X', `lua_script:${lua}`, '-r', file, '-Y', 'vtpmsplit.kind == 2', '-T', 'fields', '-E', 'separator=|',
    '-e', 'vtpmsplit.ring.event', '-e', 'vtpmsplit.ring.status', '-e', 'vtpmsplit.ring.segments', '-e', 'vtpmsplit.ring.length', '-e', 'vtpmsplit.ring.id']);
  expect(stdout.trim().split('\n')).toEqual(['2|2|3|300|72623859790382856', '3|1|0|65536|18446744073709551614', '4|0|0|0|0']);
});

it('a tap given the channel\'s own clock reading stamps its record with it instead of reading the clock again', async () => {
  const file = join(work, 'at.pcapng');
  const c = new GuestCapture(file, 1 << 20, 9, 0, () => {});
  const now = vi.spyOn(performance, 'now');
  const at = 1234.5678; // a performance.now() reading, ms
  c.ring(RingEvent.V2_SUBMIT, 0, 0, 12, undefined, at);
  expect(now).not.toHaveBeenCalled();
  c.ring(RingEvent.V2_FINISH, 0, 0, 20, undefined, at + 0.002);
  expect(now).not.toHaveBeenCalled();
  now.mockRestore();
  await c.close();
  const b = fs.readFileSync(file);
  const stamps: number[] = [];
  for (let o = 68; o < b.length; o += b.readUInt32LE(o + 4)) stamps.push(b.readUInt32LE(o + 12) * 2 ** 32 + b.readUInt32LE(o + 16));
  // µs since the epoch: the clock's anchor plus the reading.
  expect(stamps).toEqual([Math.round((performance.timeOrigin + at) * 1000), Math.round((performance.timeOrigin + at + 0.002) * 1000)]);
});
