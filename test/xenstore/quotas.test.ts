// Per-domain quotas with C xenstored's defaults (nodes 1000, watches 128, transactions 10, nodes per
// transaction 1024, perms per node 5, path length 2048, node size 2048, memory 2.5 MiB, outstanding
// requests 20).
// dom0 is exempt. A guest that stops reading is stalled, and one flooded with events it never reads
// is disconnected, without hurting anybody else.
import { describe, expect, it } from 'vitest';
import { XsType, encodeMessage, encodeStrings, encodeWrite } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { RawConn, connectClient, daemonPerFile, errnoOf, type Daemon } from './helpers.js';

let d: Daemon;
let dom0: XsClient;

daemonPerFile((dd, cc) => ((d = dd), (dom0 = cc)));

async function guest(domid: number): Promise<XsClient> {
  await dom0.introduce(domid);
  return connectClient(d.domSocket(domid));
}

describe('quotas', () => {
  it('lets a guest own 1000 nodes and no more (ENOSPC); dom0 is exempt', async () => {
    const g = await guest(11);
    // its home counts as one
    await Promise.all(Array.from({ length: 999 }, (_, i) => g.write(`n${i}`, '')));
    expect(await errnoOf(g.write('one-more', ''))).toBe('ENOSPC');
    // freeing one makes room again
    await g.rm('n0');
    await g.write('one-more', '');
    await Promise.all(Array.from({ length: 1100 }, (_, i) => dom0.write(`/dom0-many/n${i}`, '')));
    await g.close();
  });

  it('limits a guest node to 2048 bytes (value plus 8 per permission)', async () => {
    const g = await guest(12);
    await g.write('fits', Buffer.alloc(2040, 0x41));
    expect(await errnoOf(g.write('toobig', Buffer.alloc(2041, 0x41)))).toBe('ENOSPC');
    await dom0.write('/dom0-big', Buffer.alloc(4000, 0x41));
    await g.close();
  });

  it('limits the bytes a guest owns (names, values, permissions) to 2.5 MiB (ENOSPC)', async () => {
    const g = await guest(20);
    const name = (i: number) => `n${String(i).padStart(4, '0')}-${'x'.repeat(1000)}`;
    const value = Buffer.alloc(2000, 0x44);
    // each node costs 1006 + 2000 + 8 bytes: the memory quota bites before the 1000-node quota
    let written = 0;
    for (;;) {
      const r = await errnoOf(g.write(name(written), value));
      if (r !== 'no error') {
        expect(r).toBe('ENOSPC');
        break;
      }
      written++;
    }
    // its home (name "20", one permission) costs 10 bytes
    expect(written).toBe(Math.floor((2.5 * 1024 * 1024 - 10) / 3014));
    await g.rm(name(0));
    await g.write(name(0), value);
    await g.close();
  });

  it('limits a guest to 5 permissions per node', async () => {
    const g = await guest(13);
    await g.write('p', 'v');
    const perms = (n: number) => [{ domid: 13, access: 'n' as const }, ...Array.from({ length: n - 1 }, (_, i) => ({ domid: 100 + i, access: 'r' as const }))];
    await g.setPerms('p', perms(5));
    expect(await errnoOf(g.setPerms('p', perms(6)))).toBe('ENOSPC');
    await g.close();
  });

  it('limits a guest to 128 watches (E2BIG)', async () => {
    const g = await guest(14);
    for (let i = 0; i < 128; i++) await g.watch(`w${i}`);
    expect(await errnoOf(g.watch('w128'))).toBe('E2BIG');
    await g.close();
  });

  it('limits a guest to 10 open transactions (ENOSPC)', async () => {
    const g = await guest(15);
    const txs = [];
    for (let i = 0; i < 10; i++) txs.push(await g.transactionStart());
    expect(await errnoOf(g.transactionStart())).toBe('ENOSPC');
    await g.transactionEnd(txs[0]!, false);
    txs[0] = await g.transactionStart();
    await g.close();
  });

  it('limits a guest transaction to 1024 touched nodes (ENOSPC)', async () => {
    const g = await guest(16);
    const tx = await g.transactionStart();
    // every distinct node read (here: absent ones) is remembered for the commit check
    const results = await Promise.all(Array.from({ length: 1030 }, (_, i) => errnoOf(g.read(`absent${i}`, tx))));
    expect(results.slice(0, 1024).every((r) => r === 'ENOENT')).toBe(true);
    expect(results.slice(1024).every((r) => r === 'ENOSPC')).toBe(true);
    await g.close();
  });

  it('limits a guest path to 2048 characters beyond its home (EINVAL)', async () => {
    const g = await guest(17);
    const seg = (n: number) => Array.from({ length: Math.ceil(n / 10) }, () => 'abcdefghi').join('/').slice(0, n);
    await g.write(seg(2047), 'ok');
    expect(await errnoOf(g.write(seg(2049), 'x'))).toBe('EINVAL');
    await g.close();
  });

  it('stops reading a guest that does not read its replies, then serves it in order once it does', async () => {
    await dom0.introduce(18);
    await dom0.write('/local/domain/18/big', Buffer.alloc(2000, 0x42));
    const raw = await RawConn.connect(d.domSocket(18));
    raw.socket.pause();
    const n = 1000;
    const frames: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      frames.push(encodeMessage(XsType.READ, 2 * i, 0, encodeStrings('big')));
      frames.push(encodeMessage(XsType.WRITE, 2 * i + 1, 0, encodeWrite('count', String(i))));
    }
    raw.send(Buffer.concat(frames));
    await new Promise((r) => setTimeout(r, 300));
    // the daemon stopped after what the socket buffers hold, far short of all requests
    const done = Number(await dom0.readString('/local/domain/18/count'));
    expect(done).toBeLessThan(n - 1);
    raw.socket.resume();
    const msgs = await raw.waitMessages(2 * n, 20_000);
    expect(msgs.map((m) => m.reqId)).toEqual(Array.from({ length: 2 * n }, (_, i) => i));
    expect(await dom0.readString('/local/domain/18/count')).toBe(String(n - 1));
    raw.close();
  });

  it('stalls (never drops) a dom0 client that stops reading, with a larger allowance', async () => {
    await dom0.write('/dom0big', Buffer.alloc(2000, 0x43));
    const raw = await RawConn.connect(d.socket);
    raw.socket.pause();
    const n = 3000;
    const frames: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      frames.push(encodeMessage(XsType.READ, 2 * i, 0, encodeStrings('/dom0big')));
      frames.push(encodeMessage(XsType.WRITE, 2 * i + 1, 0, encodeWrite('/dom0count', String(i))));
    }
    raw.send(Buffer.concat(frames));
    await new Promise((r) => setTimeout(r, 300));
    expect(Number(await dom0.readString('/dom0count'))).toBeLessThan(n - 1);
    raw.socket.resume();
    const msgs = await raw.waitMessages(2 * n, 20_000);
    expect(msgs.map((m) => m.reqId)).toEqual(Array.from({ length: 2 * n }, (_, i) => i));
    raw.close();
  });

  it('disconnects a guest that never reads its watch events, and only it', async () => {
    await dom0.introduce(19);
    const raw = await RawConn.connect(d.domSocket(19));
    raw.socket.pause();
    const token = 't'.repeat(1000);
    raw.send(encodeMessage(XsType.WATCH, 1, 0, encodeStrings('/flood', token)));
    await new Promise((r) => setTimeout(r, 100));
    await dom0.write('/flood', '');
    await dom0.setPerms('/flood', [{ domid: 0, access: 'r' }]);
    for (let i = 0; i < 40 && !/dom19 does not read/.test(d.stderr()); i++) {
      await Promise.all(Array.from({ length: 100 }, (_, j) => dom0.write('/flood/k', String(i * 100 + j))));
    }
    raw.socket.resume();
    await raw.waitClosed(10_000);
    expect(d.stderr()).toMatch(/dom19 does not read its watch events/);
    expect(await dom0.readString('/flood/k')).toMatch(/^[0-9]+$/);
  });
});
