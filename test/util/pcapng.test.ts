// The pcapng writer's blocks, byte for byte, and the same file read back by tshark (the real peer).
import { afterAll, expect, it, vi } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LINKTYPE_RAW, LINKTYPE_USER0, PcapngWriter } from '../../src/util/pcapng.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const run = promisify(execFile);
const work = tempDir('pcapng');
afterAll(() => removeDir(work));

it('writes a section header, one interface block per link type and enhanced packet blocks padded to 4 bytes', async () => {
  const file = join(work, 'a.pcapng');
  const w = new PcapngWriter(file, [LINKTYPE_RAW, LINKTYPE_USER0], 1 << 20);
  // 2026-12-07T00:00:00.000001Z in µs: the high and low halves of the timestamp.
  const micros = Date.UTC(2026, 11, 7) * 1000 + 1;
  w.packet(1, micros, [Uint8Array.from([0xaa, 0xbb, 0xcc]), Uint8Array.from([0xdd, 0xee])]);
  await w.close();
  const b = fs.readFileSync(file);
  const hex = (from: number, to: number): string => b.subarray(from, to).toString('hex');
  // SHB: type 0x0a0d0d0a, length 28, byte-order magic 0x1a2b3c4d, version 1.0, section length -1.
  expect(hex(0, 28)).toBe('0a0d0d0a' + '1c000000' + '4d3c2b1a' + '0100' + '0000' + 'ffffffffffffffff' + '1c000000');
  // IDB: type 1, length 20, link type 101 (raw IP) then 147 (USER0), snaplen 0x40000.
  expect(hex(28, 48)).toBe('01000000' + '14000000' + '6500' + '0000' + '00000400' + '14000000');
  expect(hex(48, 68)).toBe('01000000' + '14000000' + '9300' + '0000' + '00000400' + '14000000');
  // EPB: type 6, length 40, interface 1, timestamp high/low, captured 5, original 5, data + 3 zero bytes, length.
  const hi = Math.floor(micros / 2 ** 32);
  const lo = micros - hi * 2 ** 32;
  const u32 = (n: number): string => Buffer.from(Uint32Array.of(n).buffer).toString('hex');
  expect(hex(68, 108)).toBe('06000000' + '28000000' + '01000000' + u32(hi) + u32(lo) + '05000000' + '05000000' + 'aabbccddee000000' + '28000000');
  expect(b.length).toBe(108);
  // tshark reads it: one packet on the USER0 interface at that time.
  const { stdout } = await run('tshark', ['-r', file, '-T', 'fields', '-e', 'frame.interface_id', '-e', 'frame.time_epoch', '-e', 'frame.len']);
  expect(stdout.trim()).toBe(`1\t${Date.UTC(2026, 11, 7) / 1000}.000001000\t5`);
});

it('stops at its size bound and counts what it left out', async () => {
  const file = join(work, 'b.pcapng');
  const w = new PcapngWriter(file, [LINKTYPE_RAW], 1000);
  let full = 0;
  w.onFull = () => full++;
  for (let i = 0; i < 100; i++) w.packet(0, Date.now() * 1000, [new Uint8Array(60)]);
  await w.close();
  // 48 bytes of headers, then 92-byte packets while they fit in 1000 bytes: 10 of them.
  expect(fs.statSync(file).size).toBe(48 + 10 * 92);
  expect(w.dropped).toBe(90);
  expect(full).toBe(1);
  const { stdout } = await run('tshark', ['-r', file, '-T', 'fields', '-e', 'frame.len']);
  expect(stdout.trim().split('\n')).toHaveLength(10);
});

it('a file that cannot take more (ENOSPC on /dev/full): close still returns, and what could not be written is counted as left out', async () => {
  const w = new PcapngWriter('/dev/full', [LINKTYPE_RAW], 64 << 20);
  // Two full chunks' worth: the first hand-over fails, after which packets are left out, not queued.
  for (let i = 0; i < 2 * 1024; i++) w.packet(0, Date.now() * 1000, [new Uint8Array(1000)]);
  await new Promise((r) => setTimeout(r, 300));
  for (let i = 0; i < 10; i++) w.packet(0, Date.now() * 1000, [new Uint8Array(1000)]);
  await w.close();
  expect(w.dropped).toBeGreaterThanOrEqual(10);
});

it('the 200 ms flush queues a chunk holding more than 64 KiB as it is, without copying it on the loop, and copies out a few packets', async () => {
  const file = join(work, 'flush.pcapng');
  const w = new PcapngWriter(file, [LINKTYPE_USER0], 1 << 30);
  const from = vi.spyOn(Buffer, 'from');
  // Buffer.from(a Uint8Array) copies; Buffer.from(an ArrayBuffer, …) is a view (a chunk being reused).
  const copies = (): number => from.mock.calls.filter((a) => a[0] instanceof Uint8Array).length;
  const packet = new Uint8Array(1000);
  for (let i = 0; i < 100; i++) w.packet(0, 1, [packet]); // ~100 KiB
  const first = w.buf;
  await new Promise((r) => setTimeout(r, 300));
  expect(w.buf).not.toBe(first); // handed over: a new chunk takes the next packets
  expect(copies()).toBe(0);
  w.packet(0, 1, [packet]); // ~1 KiB
  const second = w.buf;
  await new Promise((r) => setTimeout(r, 300));
  expect(w.buf).toBe(second); // copied out, the chunk kept
  expect(copies()).toBe(1);
  from.mockRestore();
  await w.close();
  expect(fs.statSync(file).size).toBe(28 + 20 + 101 * (32 + 1000));
});
