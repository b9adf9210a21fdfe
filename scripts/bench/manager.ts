// `npm run bench -- manager [--seconds S] [--size BYTES] [--append sync|async]` (S per side and phase,
// default 10): SAVENVM throughput and latency through a real manager process (sealed, logged with one
// fdatasync per group commit, checkpointed), with 1 and 64 concurrent clients, and the latency of one
// client's sequential 9 KiB saves (a libtpms volatile blob: what every exactly-once ring command and every
// suspend waits for), against the plain way to make a file durable — write a temp file, fsync,
// rename — run by the same number of concurrent loops in the same run, on the same file system, with
// the same libuv threadpool size (64). --append picks the manager's log append mode (store.ts).
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ManagerClient } from '../../src/manager/client.js';
import { percentile, startManager, type BenchContext, type Figure } from './lib.js';


/** Saves done, seconds spent, every save's latency (ms): slices add up. */
interface Raw {
  count: number;
  secs: number;
  lat: number[];
}

function merge(a: Raw, b: Raw): Raw {
  return { count: a.count + b.count, secs: a.secs + b.secs, lat: a.lat.concat(b.lat) };
}

function arg(args: string[], name: string, dflt: number): number {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
}

/** Runs `loops` concurrent loops of `op` for `seconds`; every op's latency counts. */
async function drive(loops: number, seconds: number, op: (loop: number) => Promise<void>): Promise<Raw> {
  const lat: number[] = [];
  const end = Date.now() + seconds * 1000;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: loops }, async (_, l) => {
      while (Date.now() < end) {
        const t = process.hrtime.bigint();
        await op(l);
        lat.push(Number(process.hrtime.bigint() - t) / 1e6);
      }
    }),
  );
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  return { count: lat.length, secs, lat };
}


/** A manager with `clients` attached clients, each with its own open instance, ready to be driven. */
async function oursSetup(clients: number, size: number, base: string, extra: string[]): Promise<{ slice(seconds: number): Promise<Raw>; stop(): Promise<void> }> {
  const stateDir = path.join(base, `ours-${clients}-${size}-state`);
  const runDir = path.join(base, `ours-${clients}-${size}-run`);
  const m = await startManager('manager', stateDir, runDir, extra);
  const cs = await Promise.all(Array.from({ length: clients }, () => ManagerClient.connect(runDir)));
  const inst = await Promise.all(
    cs.map((c, i) => c.open({ vmUuid: `b0000000-0000-4000-8000-${(i + 1).toString(16).padStart(12, '0')}`, version: '2.0' })),
  );
  const blob = crypto.randomBytes(size);
  await Promise.all(cs.map((c, i) => c.store(inst[i]!.instance, 'permanent', blob))); // warm-up
  return {
    slice: (seconds) => drive(clients, seconds, (l) => cs[l]!.store(inst[l]!.instance, 'permanent', blob)),
    stop: async () => {
      for (const c of cs) c.disconnect();
      await m.stop();
    },
  };
}

/**
 * The peer runs in its own process with the same threadpool size as the manager, so both get the
 * same number of fsyncs in flight; only the durability protocol differs.
 */
const PEER_SCRIPT = `
import fsp from 'node:fs/promises';
import path from 'node:path';
const [dir, loopsS, secondsS, sizeS] = process.argv.slice(1);
const loops = Number(loopsS), seconds = Number(secondsS);
const blob = Buffer.alloc(Number(sizeS), 0x5a);
const lat = [];
const end = Date.now() + seconds * 1000;
const t0 = process.hrtime.bigint();
await Promise.all(Array.from({ length: loops }, async (_, l) => {
  const tmp = path.join(dir, 'nv' + l + '.tmp');
  const dst = path.join(dir, 'nv' + l);
  while (Date.now() < end) {
    const t = process.hrtime.bigint();
    const fh = await fsp.open(tmp, 'w', 0o600);
    await fh.writeFile(blob);
    await fh.sync();
    await fh.close();
    await fsp.rename(tmp, dst);
    lat.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
}));
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
process.stdout.write(JSON.stringify({ count: lat.length, secs, lat }));
`;

async function peer(loops: number, seconds: number, size: number, base: string): Promise<Raw> {
  const dir = path.join(base, `peer-${loops}-${size}`);
  fs.mkdirSync(dir, { recursive: true });
  const p = spawn(process.execPath, ['--input-type=module', '-e', PEER_SCRIPT, dir, String(loops), String(seconds), String(size)], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, UV_THREADPOOL_SIZE: '64' },
  });
  let out = '';
  p.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const code = await new Promise<number | null>((r) => p.on('exit', r));
  if (code !== 0) throw new Error(`peer loop exited with ${code}`);
  return JSON.parse(out) as Raw;
}

/**
 * The machine may be shared, so ours and the peer run in alternating slices (SLICES each, a fifth of
 * --seconds apiece) and their slices are pooled: a change in background load hits both alike.
 */
const SLICES = 5;

/** Ours and the peer in SLICES alternating slices each, pooled. */
async function compare(ctx: BenchContext, n: number, size: number, seconds: number, base: string, extra: string[]): Promise<{ o: Raw; p: Raw }> {
  ctx.log(`${n} client(s): ${SLICES} alternating slices of ${seconds / SLICES}s, ${size}-byte saves`);
  const m = await oursSetup(n, size, base, extra);
  let o: Raw = { count: 0, secs: 0, lat: [] };
  let p: Raw = { count: 0, secs: 0, lat: [] };
  try {
    for (let k = 0; k < SLICES; k++) {
      o = merge(o, await m.slice(seconds / SLICES));
      p = merge(p, await peer(n, seconds / SLICES, size, base));
    }
  } finally {
    await m.stop();
  }
  return { o, p };
}

/** About the size of a libtpms TPM 2.0 volatile blob after some PCR extends (what a suspend saves). */
const VOLATILE_BYTES = 9 * 1024;

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const seconds = arg(ctx.args, '--seconds', 10);
  const size = arg(ctx.args, '--size', 16 * 1024);
  const ai = ctx.args.indexOf('--append');
  const extra = ai >= 0 ? ['--append', ctx.args[ai + 1]!] : [];
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-bench-manager-'));
  const figures: Figure[] = [];
  const note = `write+fsync+rename loops, ${size / 1024} KiB, same fs`;
  try {
    {
      const { o, p } = await compare(ctx, 1, VOLATILE_BYTES, seconds, base, extra);
      const n9 = `write+fsync+rename loop, 9 KiB, same fs`;
      ctx.log(`  ours p50 ${percentile(o.lat, 50).toFixed(3)} ms p99 ${percentile(o.lat, 99).toFixed(3)} ms; peer p50 ${percentile(p.lat, 50).toFixed(3)} ms p99 ${percentile(p.lat, 99).toFixed(3)} ms`);
      figures.push({ id: 'save_p50_1', unit: 'ms', ours: percentile(o.lat, 50), peer: percentile(p.lat, 50), note: n9 });
      figures.push({ id: 'save_p99_1', unit: 'ms', ours: percentile(o.lat, 99), peer: percentile(p.lat, 99), note: n9 });
    }
    for (const n of [1, 64]) {
      const { o, p } = await compare(ctx, n, size, seconds, base, extra);
      const oRate = o.count / o.secs;
      const pRate = p.count / p.secs;
      ctx.log(`  ours ${oRate.toFixed(0)}/s p99 ${percentile(o.lat, 99).toFixed(2)} ms; peer ${pRate.toFixed(0)}/s p99 ${percentile(p.lat, 99).toFixed(2)} ms`);
      figures.push({ id: `saves_per_s_${n}`, unit: 'saves/s', ours: oRate, peer: pRate, note });
      // The 16 KiB one-client p99 (save_p99_1 before the 9 KiB figures above took that name).
      figures.push({ id: n === 1 ? 'save_p99_1_16k' : `save_p99_${n}`, unit: 'ms', ours: percentile(o.lat, 99), peer: percentile(p.lat, 99), note });
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
  return figures;
}
