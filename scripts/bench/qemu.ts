// QEMU endpoint vs swtpm 0.7.1 as QEMU uses them (control socket + SET_DATAFD data channel):
// control round trip, a small TPM command through the data channel, QEMU's pre_save (GET_STATEBLOB
// permanent + volatile + savestate) and post_load (STOP, SET_STATEBLOB ×2, INIT with DELETE_VOLATILE).
// Ours and the peer are sampled alternately so machine noise hits both alike. Beside each latency, the
// CPU the serving process spent per round trip (ours: the backend, polling included; swtpm's process).
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { closeFd, sendWithFds, socketPair } from '../../native/unix-rights.js';
import { cpuNsAllThreads, median, placedMedians, settle, usSince, type BenchContext, type Figure } from './lib.js';

const exec = promisify(execFile);
const MAIN = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'cli', 'main.js');

class Conn {
  #buf = Buffer.alloc(0);
  #want = 0;
  #done: ((b: Buffer) => void) | null = null;
  constructor(readonly sock: net.Socket, readonly framed: boolean) {
    sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#check();
    });
  }
  #check(): void {
    if (!this.#done) return;
    let n = this.#want;
    if (this.framed) {
      if (this.#buf.length < 10) return;
      n = this.#buf.readUInt32BE(2);
    }
    if (this.#buf.length < n) return;
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    const d = this.#done;
    this.#done = null;
    d(out);
  }
  /** Control: read exactly `n` bytes; data (framed): one TPM response. */
  req(bytes: Buffer, n = 0): Promise<Buffer> {
    return new Promise((resolve) => {
      this.#want = n;
      this.#done = resolve;
      this.sock.write(bytes);
      this.#check();
    });
  }
  /** GET_STATEBLOB: header, then totlength bytes. */
  async getBlob(type: number): Promise<Buffer> {
    const h = await this.req(hex(`0000000c 00000001 ${type.toString(16).padStart(8, '0')} 00000000`), 16);
    return h.readUInt32BE(0) === 0 ? this.req(Buffer.alloc(0), h.readUInt32BE(8)) : Buffer.alloc(0);
  }
}

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

async function open(ctrl: string): Promise<{ c: Conn; d: Conn }> {
  for (let i = 0; !fs.existsSync(ctrl); i++) {
    if (i > 2000) throw new Error(`${ctrl} never appeared`);
    await new Promise((r) => setTimeout(r, 5));
  }
  const sock = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect(ctrl, () => resolve(s));
    s.once('error', reject);
  });
  const c = new Conn(sock, false);
  const [mine, theirs] = socketPair();
  const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
  const done = c.req(Buffer.alloc(0), 4);
  sendWithFds(fd, hex('00000010'), [theirs]);
  closeFd(theirs);
  if ((await done).readUInt32BE(0) !== 0) throw new Error('SET_DATAFD refused');
  const d = new Conn(new net.Socket({ fd: mine, readable: true, writable: true }), true);
  // QEMU's reset sequence, then the guest's Startup.
  await c.req(hex('0000000e'), 4);
  await c.req(hex('00000011 00001000'), 16);
  await c.req(hex('00000002 00000000'), 4);
  await d.req(hex('8001 0000000c 00000144 0000'));
  return { c, d };
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const work = fs.mkdtempSync(join(os.tmpdir(), 'vtpm-bench-qemu-'));
  const env = { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: process.env['UV_THREADPOOL_SIZE'] ?? '16' };
  const cli = (...a: string[]) => exec(process.execPath, [MAIN, ...a], { env });
  const run = join(work, 'run');
  const oursCtrl = join(work, 'ours.sock');
  const peerCtrl = join(work, 'swtpm.sock');
  fs.mkdirSync(join(work, 'swtpm'));
  const sw = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${join(work, 'swtpm')}`, '--ctrl', `type=unixio,path=${peerCtrl}`], { stdio: 'ignore' });
  try {
    await cli('host', 'up', '--run', run, '--state', join(work, 'state'));
    await cli('qemu', 'attach', '--run', run, '--vm', '0b0e0c0d-0000-4000-8000-000000000001', '--ctrl', oursCtrl);
    const ours = await open(oursCtrl);
    const peer = await open(peerCtrl);
    const hostInfo = JSON.parse(fs.readFileSync(join(run, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
    const pids = [hostInfo.processes.find((p) => p.role === 'backend')!.pid, sw.pid!];
    const sides = [ours, peer];
    /** CPU µs per round trip of each side's serving process during the last time() call. */
    let cpu: [number, number] = [0, 0];
    const time = async (n: number, f: (s: { c: Conn; d: Conn }) => Promise<unknown>): Promise<[number, number]> => {
      const t: [number[], number[]] = [[], []];
      const c0 = pids.map(cpuNsAllThreads);
      for (let i = 0; i < n; i++) {
        for (const k of [0, 1] as const) {
          const t0 = process.hrtime.bigint();
          await f(sides[k]!);
          t[k].push(usSince(t0));
        }
      }
      cpu = [(cpuNsAllThreads(pids[0]!) - c0[0]!) / 1000 / n, (cpuNsAllThreads(pids[1]!) - c0[1]!) / 1000 / n];
      return [median(t[0]), median(t[1])];
    };
    const figs: Figure[] = [];
    const note = 'swtpm 0.7.1 (socket --ctrl unixio, SET_DATAFD)';
    // Warm up both paths first (JIT, first allocations), so the CPU figures are per message, not start-up.
    await time(300, (s) => s.c.req(hex('00000001'), 8));
    await time(300, (s) => s.d.req(hex('8001 0000000c 0000017b 0010')));
    // Starting the host leaves CPU pressure in the kernel's 10 s average, and our endpoint's polling
    // stands down under pressure: measure both sides once it has passed, as a long-running host is.
    await settle(ctx);
    ctx.log('control round trip');
    const [c0, c1] = await time(2000, (s) => s.c.req(hex('00000001'), 8));
    figs.push({ id: 'ctrl_p50', unit: 'µs', ours: c0, peer: c1, note, target: { on: 'ratio', op: '<=', value: 1 } });
    figs.push({ id: 'ctrl_cpu_per_op', unit: 'µs', ours: cpu[0], peer: cpu[1], note: 'CPU of the serving process per round trip' });
    ctx.log('data channel');
    const [d0, d1] = await time(2000, (s) => s.d.req(hex('8001 0000000c 0000017b 0010')));
    figs.push({ id: 'data_getrandom_p50', unit: 'µs', ours: d0, peer: d1, note, target: { on: 'ratio', op: '<=', value: 1 } });
    figs.push({ id: 'data_cpu_per_op', unit: 'µs', ours: cpu[0], peer: cpu[1], note: 'CPU of the serving process per round trip' });
    // The same data round trip with both sides pinned alike (docs/benchmarks.md, "Why the peer's figure
    // moves"): the figures above are whatever placement the scheduler chose in this run.
    const rtts = (s: { c: Conn; d: Conn }) => async (n: number) => {
      const t: number[] = [];
      for (let i = 0; i < n; i++) {
        const t0 = process.hrtime.bigint();
        await s.d.req(hex('8001 0000000c 0000017b 0010'));
        t.push(usSince(t0));
      }
      return t;
    };
    const placed = await placedMedians(ctx, { clients: [process.pid], ours: { servers: [pids[0]!], rtt: rtts(ours) }, peer: { servers: [pids[1]!], rtt: rtts(peer) } }, 2000);
    for (const [where, m] of placed) {
      figs.push({ id: `data_getrandom_p50_${where}`, unit: 'µs', ours: m.ours, peer: m.peer, note: `client and server ${where === 'apart' ? 'on different vCPUs' : 'on one vCPU'}, both sides pinned alike` });
    }
    ctx.log('pre_save');
    const blobs: Array<[Buffer, Buffer]> = [];
    const [s0, s1] = await time(100, async (s) => {
      const p = await s.c.getBlob(1);
      const v = await s.c.getBlob(2);
      await s.c.getBlob(3);
      blobs[s === ours ? 0 : 1] = [p, v];
    });
    figs.push({ id: 'pre_save_p50', unit: 'µs', ours: s0, peer: s1, note, target: { on: 'ratio', op: '<=', value: 1 } });
    ctx.log('post_load');
    const setBlob = (c: Conn, type: number, b: Buffer) =>
      c.req(Buffer.concat([hex(`0000000d 00000000 ${type.toString(16).padStart(8, '0')}`), u32(b.length), b]), 4);
    const [l0, l1] = await time(100, async (s) => {
      const [p, v] = blobs[s === ours ? 0 : 1]!;
      await s.c.req(hex('0000000e'), 4);
      if ((await setBlob(s.c, 1, p)).readUInt32BE(0) !== 0) throw new Error('SET_STATEBLOB permanent failed');
      if ((await setBlob(s.c, 2, v)).readUInt32BE(0) !== 0) throw new Error('SET_STATEBLOB volatile failed');
      await s.c.req(hex('00000002 00000001'), 4);
    });
    figs.push({ id: 'post_load_p50', unit: 'µs', ours: l0, peer: l1, note, target: { on: 'ratio', op: '<=', value: 2 } });
    for (const s of sides) {
      s.d.sock.destroy();
      s.c.sock.destroy();
    }
    return figs;
  } finally {
    sw.kill();
    await cli('host', 'down', '--run', run).catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}
