// `npm run bench -- ring`: cross-process round trip and throughput of a ring.h ring (grant-mapped page
// + event channel) against a UNIX-socket echo between the same two processes, in the same run, with the
// CPU both processes spend per round trip beside each (the ring's ends poll: docs/protocols/event-channels.md).
// This process is the frontend and the socket client; one child is the backend and the echo server.
import { fork } from 'node:child_process';
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Domain, EchoFrontend, ECHO_SLOT as SLOT } from '../../src/xen/index.js';
import { cpuUs, median, percentile, settle, usSince, type BenchContext, type Figure } from './lib.js';

const here = dirname(fileURLToPath(import.meta.url));

interface Transport {
  /** Issue one request now (batch: publish later with flush()). */
  request(value: number, batch: boolean): Promise<number>;
  flush(): void;
}

class SocketClient implements Transport {
  #sock: net.Socket;
  #waiters = new Map<number, (v: number) => void>();
  #out: Buffer[] = [];
  #carry: Buffer | null = null;
  #next = 1;

  constructor(sock: net.Socket) {
    this.#sock = sock;
    sock.on('data', (chunk: Buffer) => {
      const buf = this.#carry ? Buffer.concat([this.#carry, chunk]) : chunk;
      let o = 0;
      for (; o + SLOT <= buf.length; o += SLOT) {
        const id = buf.readUInt32LE(o);
        const w = this.#waiters.get(id);
        this.#waiters.delete(id);
        w?.(buf.readUInt32LE(o + 8));
      }
      this.#carry = o < buf.length ? Buffer.from(buf.subarray(o)) : null;
    });
  }

  request(value: number, batch: boolean): Promise<number> {
    const id = this.#next++ >>> 0;
    const m = Buffer.alloc(SLOT);
    m.writeUInt32LE(id, 0);
    m.writeUInt32LE(1, 4);
    m.writeUInt32LE(value >>> 0, 8);
    this.#out.push(m);
    const p = new Promise<number>((r) => this.#waiters.set(id, r));
    if (!batch) this.flush();
    return p;
  }

  flush(): void {
    if (this.#out.length === 0) return;
    this.#sock.write(this.#out.length === 1 ? this.#out[0]! : Buffer.concat(this.#out));
    this.#out = [];
  }
}

async function sequential(t: Transport, n: number): Promise<number[]> {
  const lat: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    const r = await t.request(i, false);
    lat.push(usSince(t0));
    if (r !== i + 1) throw new Error(`bad echo ${r} for ${i}`);
  }
  return lat;
}

/** Requests per second with `inflight` outstanding; refills are published once per batch. */
function pipelined(t: Transport, n: number, inflight: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let issued = 0;
    let done = 0;
    const t0 = process.hrtime.bigint();
    const issue = (): void => {
      while (issued < n && issued - done < inflight) {
        const v = issued++;
        t.request(v, true).then((r) => {
          if (r !== v + 1) reject(new Error(`bad echo ${r} for ${v}`));
          // The same client policy for both transports: every completion issues its replacement.
          if (++done === n) resolve(n / (usSince(t0) / 1e6));
          else issue();
        }, reject);
      }
      t.flush();
    };
    issue();
  });
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const quick = ctx.args.includes('--quick');
  const nRtt = quick ? 2_000 : 20_000;
  const nTput = quick ? 20_000 : 300_000;
  const dir = mkdtempSync('/dev/shm/vtpm-bench-');
  const sockPath = join(dir, 'echo.sock');
  const child = fork(join(here, '..', '..', 'src', 'cli', 'ring-peer.js'), ['back', '0'], { env: { ...process.env, VTPM_XEN_DIR: dir } });
  const next = (kind: string): Promise<Record<string, unknown>> =>
    new Promise((resolve) => {
      const h = (m: Record<string, unknown>): void => {
        if (m.kind === kind) {
          child.off('message', h);
          resolve(m);
        }
      };
      child.on('message', h);
    });
  try {
    await next('ready');
    const dom = await Domain.create({ domid: 1, dir });
    const front = new EchoFrontend(dom, 0);
    child.send({ kind: 'offer', offer: front.offer() });
    await next('connected');
    child.send({ kind: 'echo-socket', path: sockPath });
    await next('listening');
    const sock = net.createConnection(sockPath);
    await new Promise((r) => sock.once('connect', r));
    const socket = new SocketClient(sock);
    const ring: Transport = { request: (v, b) => front.request(v, b), flush: () => front.flush() };

    // The first round trips of fresh processes (what `vtpm ring-demo` sees), then warm both paths
    // (JIT, first connections), then alternate so drift hits both alike.
    const ringCold = await sequential(ring, 200);
    const sockCold = await sequential(socket, 200);
    await sequential(ring, 2_000);
    await sequential(socket, 2_000);
    await settle(ctx);
    const ringLat: number[] = [];
    const sockLat: number[] = [];
    const cpu = { ring: 0, socket: 0 };
    const pid = child.pid!;
    const timed = async (t: Transport, into: number[], key: 'ring' | 'socket'): Promise<void> => {
      const c0 = cpuUs('self') + cpuUs(pid);
      into.push(...(await sequential(t, nRtt / 4)));
      cpu[key] += cpuUs('self') + cpuUs(pid) - c0;
    };
    for (let round = 0; round < 4; round++) {
      await timed(ring, ringLat, 'ring');
      await timed(socket, sockLat, 'socket');
    }
    ctx.log(`rtt ring p50 ${median(ringLat).toFixed(1)} µs p99 ${percentile(ringLat, 99).toFixed(1)}; socket p50 ${median(sockLat).toFixed(1)} p99 ${percentile(sockLat, 99).toFixed(1)}`);
    ctx.log(`cpu per round trip (both processes): ring ${(cpu.ring / nRtt).toFixed(1)} µs, socket ${(cpu.socket / nRtt).toFixed(1)} µs`);

    const tput = async (t: Transport, inflight: number): Promise<number> => {
      const xs: number[] = [];
      for (let i = 0; i < 3; i++) xs.push(await pipelined(t, Math.floor(nTput / 3), inflight));
      return median(xs);
    };
    await pipelined(ring, 20_000, 32);
    await pipelined(socket, 20_000, 32);
    const ring1 = await tput(ring, 1);
    const sock1 = await tput(socket, 1);
    const ring32 = await tput(ring, 32);
    const sock32 = await tput(socket, 32);
    ctx.log(`throughput 1: ring ${ring1.toFixed(0)}/s socket ${sock1.toFixed(0)}/s; 32: ring ${ring32.toFixed(0)}/s socket ${sock32.toFixed(0)}/s`);
    sock.destroy();
    await dom.destroy();
    const peer = 'UNIX-socket echo, same 2 processes';
    return [
      {
        id: 'rtt_p50',
        unit: 'µs',
        ours: median(ringLat),
        peer: median(sockLat),
        note: `${peer}; both ends poll ≤ 50 µs`,
        target: { on: 'ratio', op: '<=', value: 0.5 },
      },
      { id: 'rtt_p99', unit: 'µs', ours: percentile(ringLat, 99), peer: percentile(sockLat, 99), note: peer },
      {
        id: 'rtt_cpu_per_rt',
        unit: 'µs',
        ours: cpu.ring / nRtt,
        peer: cpu.socket / nRtt,
        note: 'CPU of both processes per sequential round trip (/proc schedstat)',
      },
      { id: 'rtt_cold_p50', unit: 'µs', ours: median(ringCold), peer: median(sockCold), note: 'first 200 round trips of fresh processes' },
      { id: 'throughput_1', unit: 'req/s', ours: ring1, peer: sock1, note: peer },
      { id: 'throughput_32', unit: 'req/s', ours: ring32, peer: sock32, note: peer, target: { on: 'ratio', op: '>=', value: 2 } },
    ];
  } finally {
    child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}
