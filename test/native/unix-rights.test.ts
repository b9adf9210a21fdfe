// The control-socket reader (native/unix-rights.ts): libuv's poll watcher on the main loop plus
// recvmsg(), so descriptors passed with SCM_RIGHTS survive, as QEMU's CMD_SET_DATAFD needs.
import fs from 'node:fs';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { RightsReader, closeFd, sendWithFds, socketPair, type Received } from '../../native/unix-rights.js';

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

describe('RightsReader', () => {
  it('delivers bytes in order with the descriptor that rode on them, then end; leaves no descriptor behind', async () => {
    const before = openFds();
    const [ours, peer] = socketPair();
    const [keep, passed] = socketPair();
    const sock = new net.Socket({ fd: ours, readable: false, writable: true });
    const rs = RightsReader.shared().add(ours);
    const got: Received[] = [];
    const ended = new Promise<string | undefined>((resolve) => rs.on('end', resolve));
    rs.on('data', (r: Received) => got.push(r));

    const big = Buffer.alloc(10_000, 0x5a);
    sendWithFds(peer, Buffer.from('00000010', 'hex'), [passed]);
    for (let off = 0; off < big.length; off += 4000) sendWithFds(peer, big.subarray(off, off + 4000), []);
    closeFd(passed);
    closeFd(peer);
    expect(await ended).toBeUndefined();

    const bytes = Buffer.concat(got.map((r) => Buffer.from(r.data)));
    expect(bytes.subarray(0, 4).toString('hex')).toBe('00000010');
    expect(bytes.length).toBe(4 + big.length);
    expect(bytes.subarray(4).equals(big)).toBe(true);
    const fds = got.flatMap((r) => r.fds);
    expect(fds).toHaveLength(1);
    expect(got[0]!.fds).toEqual(fds); // the descriptor came with the first message, not later
    // It is the other end of `keep`: what we write there comes out of it.
    const a = new net.Socket({ fd: fds[0]!, readable: true, writable: false });
    const echoed = new Promise<string>((resolve) => a.once('data', (d: Buffer) => resolve(d.toString())));
    const b = new net.Socket({ fd: keep, readable: false, writable: true });
    b.write('through the passed fd');
    expect(await echoed).toBe('through the passed fd');
    a.destroy();
    b.destroy();
    rs.close();
    sock.destroy();
    await new Promise((r) => setTimeout(r, 50));
    expect(openFds()).toBe(before);
  });

  it('close() stops reading at once and closes its duplicate; the owner keeps its socket', async () => {
    const [ours, peer] = socketPair();
    const before = openFds();
    const rs = RightsReader.shared().add(ours);
    expect(openFds()).toBe(before + 1); // the reader's dup
    const got: Received[] = [];
    rs.on('data', (r: Received) => got.push(r));
    rs.close();
    sendWithFds(peer, Buffer.from('late'), []);
    await new Promise((r) => setTimeout(r, 50));
    expect(got).toEqual([]);
    expect(openFds()).toBe(before);
    closeFd(ours);
    closeFd(peer);
  });
});
