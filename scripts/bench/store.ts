// `npm run bench -- store [--seconds S] [--size BYTES]` (S per side and client count, default 10):
// SAVENVM throughput and p99 latency through a real manager process with 1 and 64 concurrent clients,
// its state in a 3-member etcd cluster on loopback (ours: every save a claim-conditioned transaction,
// group-committed, acknowledged once a quorum has it) against the same manager on its local
// write-ahead-log store (peer: one pwrite + fdatasync per group commit), in alternating slices of the
// same run. Both seal every blob the same way; only the store differs.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ManagerClient } from '../../src/manager/client.js';
import { EtcdCluster } from './_etcd.js';
import { percentile, startManager, type BenchContext, type Figure } from './lib.js';

const SLICES = 5;

interface Raw {
  count: number;
  secs: number;
  lat: number[];
}

const merge = (a: Raw, b: Raw): Raw => ({ count: a.count + b.count, secs: a.secs + b.secs, lat: a.lat.concat(b.lat) });

function arg(args: string[], name: string, dflt: number): number {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
}


/** A manager with `n` clients, each with its own open VM, and a way to drive them for a while. */
async function setup(n: number, size: number, dir: string, extra: string[]): Promise<{ slice(seconds: number): Promise<Raw>; stop(): Promise<void> }> {
  const run = path.join(dir, 'run');
  const m = await startManager('store', path.join(dir, 'state'), run, extra);
  const cs = await Promise.all(Array.from({ length: n }, () => ManagerClient.connect(run)));
  const inst = await Promise.all(cs.map((c) => c.open({ vmUuid: crypto.randomUUID(), version: '2.0' }).then((o) => o.instance)));
  const blob = crypto.randomBytes(size);
  await Promise.all(cs.map((c, i) => c.store(inst[i]!, 'volatile', blob)));
  return {
    async slice(seconds) {
      const lat: number[] = [];
      const end = Date.now() + seconds * 1000;
      const t0 = process.hrtime.bigint();
      await Promise.all(
        cs.map(async (c, i) => {
          while (Date.now() < end) {
            const t = process.hrtime.bigint();
            await c.store(inst[i]!, 'volatile', blob);
            lat.push(Number(process.hrtime.bigint() - t) / 1e6);
          }
        }),
      );
      return { count: lat.length, secs: Number(process.hrtime.bigint() - t0) / 1e9, lat };
    },
    async stop() {
      for (const c of cs) c.disconnect();
      await m.stop();
    },
  };
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const seconds = arg(ctx.args, '--seconds', 10);
  const size = arg(ctx.args, '--size', 9 * 1024);
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-bench-store-'));
  const key = path.join(base, 'master.key');
  fs.writeFileSync(key, crypto.randomBytes(32), { mode: 0o600 });
  const etcd = await EtcdCluster.start(3, { dir: path.join(base, 'etcd') });
  const figures: Figure[] = [];
  const note = `local WAL store (pwrite+fdatasync), ${size} B`;
  try {
    for (const n of [1, 64]) {
      ctx.log(`${n} client(s): ${SLICES} alternating slices of ${seconds / SLICES}s, ${size}-byte saves; etcd ${etcd.endpoints}`);
      const ours = await setup(n, size, path.join(base, `etcd-${n}`), ['--store', `${etcd.url}/bench${n}`, '--master-key', key]);
      const peer = await setup(n, size, path.join(base, `wal-${n}`), []);
      let o: Raw = { count: 0, secs: 0, lat: [] };
      let p: Raw = { count: 0, secs: 0, lat: [] };
      try {
        for (let k = 0; k < SLICES; k++) {
          o = merge(o, await ours.slice(seconds / SLICES));
          p = merge(p, await peer.slice(seconds / SLICES));
        }
      } finally {
        await ours.stop();
        await peer.stop();
      }
      ctx.log(`  etcd ${(o.count / o.secs).toFixed(0)}/s p99 ${percentile(o.lat, 99).toFixed(2)} ms; local ${(p.count / p.secs).toFixed(0)}/s p99 ${percentile(p.lat, 99).toFixed(2)} ms`);
      figures.push({ id: `etcd_saves_per_s_${n}`, unit: 'saves/s', ours: o.count / o.secs, peer: p.count / p.secs, note });
      figures.push({ id: `etcd_save_p99_${n}`, unit: 'ms', ours: percentile(o.lat, 99), peer: percentile(p.lat, 99), note });
    }
  } finally {
    await etcd.stop();
    fs.rmSync(base, { recursive: true, force: true });
  }
  return figures;
}
