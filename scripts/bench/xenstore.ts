// `npm run bench -- xenstore`: reads/s and writes/s through one client, and watch-fire latency (a
// write on one connection until the event arrives on another), against a `vtpm xenstored` process.
// The peer is a UNIX-socket responder in a child process answering frames of the same sizes, so the
// ratio shows what the daemon adds on top of the socket round trip itself.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { XsClient } from '../../src/xenstore/client.js';
import { XsType, encodeStrings, encodeWrite } from '../../src/xenstore/wire.js';
import { percentile, usSince, type BenchContext, type Figure } from './lib.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const VALUE = Buffer.alloc(64, 0x61);
const KEY = '/bench/key';
const WATCHED = '/bench/w';

function startChild(args: string[], readyWord: string): Promise<ChildProcess> {
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes(readyWord)) resolve(proc);
    });
    proc.once('exit', (code) => reject(new Error(`${args.join(' ')} exited ${code}`)));
  });
}

async function stopChild(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null) return;
  const done = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  await done;
}

/** Sequential round trips for `ms` milliseconds (after a warm-up); returns ops/s. */
async function rate(op: () => Promise<unknown>, ms: number): Promise<number> {
  for (let i = 0; i < 500; i++) await op();
  let n = 0;
  const t0 = process.hrtime.bigint();
  const end = Date.now() + ms;
  while (Date.now() < end) {
    for (let i = 0; i < 100; i++) await op();
    n += 100;
  }
  return n / (usSince(t0) / 1e6);
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const ms = Number(ctx.args[ctx.args.indexOf('--ms') + 1]) || 3000;
  const samples = 3000;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-bench-xs-'));
  const daemon = await startChild(
    [path.join(here, '../../src/cli/main.js'), 'xenstored', '--socket', path.join(dir, 'xs'), '--domain-socket-dir', path.join(dir, 'doms')],
    'listening',
  );
  const peer = await startChild([path.join(here, '_echo-peer.js'), path.join(dir, 'echo')], 'ready');
  try {
    const c = await XsClient.connect(path.join(dir, 'xs'));
    const watcher = await XsClient.connect(path.join(dir, 'xs'));
    const e = await XsClient.connect(path.join(dir, 'echo'));
    await c.write(KEY, VALUE);

    // message sizes: READ request "/bench/key\0" → 64-byte value; WRITE "/bench/key\0"+64 → "OK\0";
    // watch: WRITE "/bench/w\0"+64 on one side → WATCH_EVENT "/bench/w\0<token>\0" on the other
    const readReq = encodeStrings(KEY);
    const writeReq = encodeWrite(KEY, VALUE);
    ctx.log(`reads for ${ms} ms`);
    const readOurs = await rate(() => c.read(KEY), ms);
    const readPeer = await rate(() => e.request(XsType.READ, readReq, VALUE.length), ms);
    ctx.log(`writes for ${ms} ms`);
    const writeOurs = await rate(() => c.write(KEY, VALUE), ms);
    const writePeer = await rate(() => e.request(XsType.WRITE, writeReq, 3), ms);

    ctx.log(`${samples} watch firings`);
    let pending: (() => void) | undefined;
    const w = await watcher.watch(WATCHED, () => pending?.());
    const eventLen = encodeStrings(WATCHED, w.token).length;
    await new Promise((r) => setTimeout(r, 50));
    const oursLat: number[] = [];
    for (let i = 0; i < samples + 200; i++) {
      const t0 = process.hrtime.bigint();
      const fired = new Promise<void>((r) => (pending = r));
      void c.write(WATCHED, VALUE);
      await fired;
      if (i >= 200) oursLat.push(usSince(t0));
    }
    const watchReq = encodeWrite(WATCHED, VALUE);
    const peerLat: number[] = [];
    for (let i = 0; i < samples + 200; i++) {
      const t0 = process.hrtime.bigint();
      await e.request(XsType.WRITE, watchReq, eventLen);
      if (i >= 200) peerLat.push(usSince(t0));
    }
    for (const x of [c, watcher, e]) await x.close();
    const note = 'UNIX-socket responder, same frame sizes';
    return [
      { id: 'read_ops', unit: 'ops/s', ours: readOurs, peer: readPeer, note },
      { id: 'write_ops', unit: 'ops/s', ours: writeOurs, peer: writePeer, note },
      { id: 'watch_p50', unit: 'µs', ours: percentile(oursLat, 50), peer: percentile(peerLat, 50), note },
      { id: 'watch_p99', unit: 'µs', ours: percentile(oursLat, 99), peer: percentile(peerLat, 99), note },
    ];
  } finally {
    await stopChild(peer);
    await stopChild(daemon);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
