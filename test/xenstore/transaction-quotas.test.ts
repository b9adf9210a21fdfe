// A guest's transactions are bounded like Xen's: at most 1024 modifying requests in one transaction
// (oxenstored's quota-maxrequests) and the bytes its open transactions hold count against its 2.5 MiB
// memory quota (as C xenstored charges transaction nodes). Past either: ENOSPC to the offender, the
// daemon's memory stays flat, and other guests notice nothing.
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import type { XsClient } from '../../src/xenstore/client.js';
import { connectClient, daemonPerFile, errnoOf, type Daemon } from './helpers.js';

let d: Daemon;
let dom0: XsClient;

daemonPerFile((dd, cc) => ((d = dd), (dom0 = cc)));

async function guest(domid: number): Promise<XsClient> {
  await dom0.introduce(domid);
  return connectClient(d.domSocket(domid));
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) / 1024;
}

describe('transaction quotas', () => {
  it('refuses the 1025th request of one guest transaction (ENOSPC), keeps the daemon flat and others served', async () => {
    const g = await guest(31);
    const other = await guest(32);
    const value = Buffer.alloc(2000, 0x41);
    const rss0 = rssMiB(d.proc.pid!);
    const tx = await g.transactionStart();
    const n = 10_000;
    const results: Promise<string>[] = [];
    for (let i = 0; i < n; i++) results.push(errnoOf(g.write('big', value, tx)));
    // while the flood is processed, another guest's requests are answered promptly
    const t0 = Date.now();
    await other.write('alive', 'yes');
    expect(await other.readString('alive')).toBe('yes');
    expect(Date.now() - t0).toBeLessThan(2000);
    const r = await Promise.all(results);
    expect(r.slice(0, 1024).every((x) => x === 'no error')).toBe(true);
    expect(r.slice(1024).every((x) => x === 'ENOSPC')).toBe(true);
    expect(rssMiB(d.proc.pid!) - rss0).toBeLessThan(64);
    // the requests it was granted still commit, as oxenstored keeps them
    await g.transactionEnd(tx, true);
    expect((await g.read('big')).equals(value)).toBe(true);
    await g.close();
    await other.close();
  });

  it('charges open transactions to the guest memory quota and refunds them when they end', async () => {
    const g = await guest(33);
    const value = Buffer.alloc(2000, 0x42);
    const txs = [await g.transactionStart(), await g.transactionStart(), await g.transactionStart()];
    let granted = 0;
    for (const tx of txs) {
      const r = await Promise.all(Array.from({ length: 1000 }, () => errnoOf(g.write('v', value, tx))));
      granted += r.filter((x) => x === 'no error').length;
      expect(r.filter((x) => x !== 'no error').every((x) => x === 'ENOSPC')).toBe(true);
    }
    // 2.5 MiB at 2001 bytes a request (value and the path "/local/domain/33/v" = 2018): ~1299 in all
    expect(granted).toBe(Math.floor((2.5 * 1024 * 1024 - 10) / 2018));
    // the live tree quota sees the same charge: a plain write of the same size is refused too
    expect(await errnoOf(g.write('live', value))).toBe('ENOSPC');
    for (const tx of txs) await g.transactionEnd(tx, false);
    await g.write('live', value);
    const tx = await g.transactionStart();
    await Promise.all(Array.from({ length: 1000 }, () => g.write('v', value, tx)));
    await g.transactionEnd(tx, true);
    await g.close();
  });

  it('leaves dom0 transactions unbounded', async () => {
    const tx = await dom0.transactionStart();
    await Promise.all(Array.from({ length: 1500 }, (_, i) => dom0.write('/dom0tx', String(i), tx)));
    await dom0.transactionEnd(tx, true);
    expect(await dom0.readString('/dom0tx')).toBe('1499');
  });
});
