// `npm run bench -- suspend [--cycles N] [--warmup N] [--series]`
// One guest's suspend + resume cycle under load, against swtpm doing what a save must do, same run:
//  - ours: a real host (xenstored, manager, backend processes); this process is the guest domain with a
//    GuestSession on the ring protocol and a command loop running: GetRandom (cycle_p50; reads leave
//    nothing new to save), then PCR_Extend (cycle_extend_p50; every suspend makes the changed state
//    durable). A cycle = control/shutdown = "suspend" → the session closes (backend answers in-flight,
//    makes the volatile state durable at the manager if anything changed it) → backend resume = True →
//    a new session builds a new ring, grants and event channel and is Connected.
//  - peer: `swtpm socket` with the same command loop on its data socket; a cycle = GET_STATEBLOB ×3
//    (permanent, volatile, savestate), each written to a file and fdatasync'd (the state on disk, as
//    libvirt's managed save and `xl save` need), CMD_STOP, SET_STATEBLOB ×3 read back from those files,
//    CMD_INIT, over its control socket. QEMU's order: swtpm 0.7.1 refuses GET_STATEBLOB once stopped
//    (0x0A), and a blob that does not exist answers 0x800 and is saved empty, as QEMU treats it.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { connect as netConnect, type Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import v8 from 'node:v8';
import { cpuNsAllThreads, percentile, settle, type BenchContext, type Figure } from './lib.js';
import { SwtpmProcess } from './_swtpm.js';
import { RunDir } from '../../src/cli/rundir.js';
import { daemonV8Flags } from '../../src/cli/spawn.js';
import { Domain } from '../../src/xen/index.js';
import { connect } from '../../src/xenstore/client.js';
import { writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { GuestSession } from '../../src/frontend/session.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { trace } from '../../src/util/trace.js';

const run = promisify(execFile);

/** CPU time (ms) of every thread of process `pid` so far, from the scheduler's accounting. */
const cpuMs = (pid: number): number => cpuNsAllThreads(pid) / 1e6;

function arg(ctx: BenchContext, name: string, def: string): string {
  const i = ctx.args.indexOf(`--${name}`);
  return i >= 0 && ctx.args[i + 1] ? ctx.args[i + 1]! : def;
}

/** A client of swtpm's control socket: one request, one response, in order. */
class Ctrl {
  readonly #s: Socket;
  #buf = Buffer.alloc(0);
  #want: { size: (b: Buffer) => number | null; resolve: (b: Buffer) => void } | null = null;

  private constructor(s: Socket) {
    this.#s = s;
    s.on('data', (c: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, c]);
      this.#check();
    });
  }

  static open(path: string): Promise<Ctrl> {
    return new Promise((resolve, reject) => {
      const s = netConnect(path, () => resolve(new Ctrl(s)));
      s.once('error', reject);
    });
  }

  #check(): void {
    if (!this.#want) return;
    const n = this.#want.size(this.#buf);
    if (n === null || this.#buf.length < n) return;
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    const w = this.#want;
    this.#want = null;
    w.resolve(Buffer.from(out));
  }

  #call(req: Buffer, size: (b: Buffer) => number | null): Promise<Buffer> {
    return new Promise((resolve) => {
      this.#want = { size, resolve };
      this.#s.write(req);
      this.#check();
    });
  }

  async simple(code: number, payload = Buffer.alloc(0)): Promise<number> {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(code);
    return (await this.#call(Buffer.concat([head, payload]), () => 4)).readUInt32BE(0);
  }

  async getBlob(type: number): Promise<Buffer> {
    const req = Buffer.alloc(16);
    req.writeUInt32BE(0x0c, 0);
    req.writeUInt32BE(0, 4);
    req.writeUInt32BE(type, 8);
    req.writeUInt32BE(0, 12);
    const r = await this.#call(req, (b) => (b.length < 16 ? null : 16 + b.readUInt32BE(12)));
    const rc = r.readUInt32BE(0);
    // 0x800-class: no such blob (a savestate before any Shutdown(STATE)); QEMU saves it empty.
    if (rc !== 0 && (rc & 0x800) === 0) throw new Error(`GET_STATEBLOB(${type}) answered 0x${rc.toString(16)}`);
    return r.subarray(16);
  }

  async setBlob(type: number, blob: Buffer): Promise<void> {
    const req = Buffer.alloc(16);
    req.writeUInt32BE(0x0d, 0);
    req.writeUInt32BE(0, 4);
    req.writeUInt32BE(type, 8);
    req.writeUInt32BE(blob.length, 12);
    const r = await this.#call(Buffer.concat([req, blob]), () => 4);
    if (r.readUInt32BE(0) !== 0) throw new Error(`SET_STATEBLOB(${type}) answered 0x${r.readUInt32BE(0).toString(16)}`);
  }

  close(): void {
    this.#s.destroy();
  }
}

const BLOB_TYPES = [1, 2, 3] as const; // permanent, volatile, savestate

/** The peer's save + restore: take the blobs, make them durable in files, stop, load them back, init. */
async function swtpmSaveRestore(ctrl: Ctrl, dir: string): Promise<void> {
  const files: string[] = [];
  for (const type of BLOB_TYPES) {
    const blob = await ctrl.getBlob(type);
    const file = join(dir, `blob-${type}`);
    const fd = fs.openSync(file, 'w');
    try {
      fs.writeSync(fd, blob);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    files.push(file);
  }
  let rc = await ctrl.simple(0x0e);
  if (rc !== 0) throw new Error(`CMD_STOP answered 0x${rc.toString(16)}`);
  for (const [i, type] of BLOB_TYPES.entries()) await ctrl.setBlob(type, fs.readFileSync(files[i]!));
  rc = await ctrl.simple(0x02, Buffer.alloc(4));
  if (rc !== 0) throw new Error(`CMD_INIT answered 0x${rc.toString(16)}`);
}

export async function run_(ctx: BenchContext): Promise<Figure[]> {
  // This process plays the guest: it runs with the V8 flags a guest process started by `vtpm` gets
  // (src/cli/spawn.ts), set before the guest's code is first called.
  for (const flag of daemonV8Flags()) v8.setFlagsFromString(flag);
  const cycles = Number(arg(ctx, 'cycles', '100'));
  // The handshake's code runs a few times per cycle, so V8 optimizes it only after ~100 cycles: the
  // first cycles of a fresh host took 2–3× as long (10–12 ms loaded, falling to ~4 ms by cycle 100;
  // with a lower --interrupt-budget the fall came within 30 cycles, so it is the JIT, not the host).
  // Long-running daemons are warm; the cold figure reports the first COLD cycles separately.
  const warmup = Number(arg(ctx, 'warmup', '100'));
  const COLD = Math.min(20, warmup);
  const base = fs.mkdtempSync(join(os.tmpdir(), 'vtpm-bench-suspend-'));
  const cli = join(import.meta.dirname, '..', '..', 'src', 'cli', 'main.js');
  const env = { ...process.env, VTPM_NO_SETUP: '1' };
  const runDir = join(base, 'run');
  await run(process.execPath, [cli, 'host', 'up', '--run', runDir, '--state', join(base, 'state')], { env });
  const ours: number[] = [];
  const peer: number[] = [];
  /** Per loaded cycle: how long it waited for the GetRandom in flight at its start (its checkpoint at the manager). */
  const saveWait: number[] = [];
  const oursIdle: number[] = [];
  /** The first COLD loaded cycles of a fresh host (and of swtpm), before the warm-up is over. */
  const oursCold: number[] = [];
  const peerCold: number[] = [];
  const peerIdle: number[] = [];
  /** Cycles under a PCR_Extend loop: every one of ours has a durable checkpoint to make, as swtpm's does. */
  const oursExtend: number[] = [];
  const peerExtend: number[] = [];
  let loadOurs = 0;
  let onceRate1 = 0;
  let onceRate16 = 0;
  let peerRate = 0;
  let loadPeer = 0;
  try {
    // ---- ours -------------------------------------------------------------------------------
    const h = new RunDir(runDir).readHost();
    const dom0 = await connect(h.xenstoredSocket);
    const domid = 7;
    await dom0.introduce(domid);
    await writeDeviceDirectories(dom0, { frontDomid: domid, backDomid: 0, devid: 0, uuid: '00000000-0000-4000-8000-00000000be7c' });
    const dom = await Domain.create({ domid, dir: h.xenDir });
    const xs = await connect(join(h.domainSocketDir, `dom${domid}.sock`));
    ctx.log("host up; connecting the guest");
    let s = await GuestSession.open({ xs, dom });
    await s.submit(tpm2.startup());
    // The ring's per-command cost with exactly-once: each answer waits for a checkpoint at the manager;
    // requests outstanding together share one (group commit).
    const digest = new Uint8Array(32).fill(7);
    const extendRate = async (depth: number): Promise<number> => {
      let n = 0;
      const t0 = performance.now();
      const until = t0 + 1500;
      await Promise.all(
        Array.from({ length: depth }, async () => {
          while (performance.now() < until) {
            await s.submit(tpm2.pcrExtendSha256(16, digest));
            n++;
          }
        }),
      );
      return n / ((performance.now() - t0) / 1000);
    };
    onceRate1 = await extendRate(1);
    onceRate16 = await extendRate(16);
    ctx.log(`exactly-once PCR_Extend/s: ${onceRate1.toFixed(0)} one at a time, ${onceRate16.toFixed(0)} with 16 outstanding`);
    // Start-ups and that burst leave CPU pressure behind, under which polling stands down (poll.ts).
    await settle(ctx);
    let stop = false;
    let answeredAt = 0;
    // While suspended the load waits for the resumed session instead of spinning on refusals.
    let resumed: Promise<void> = Promise.resolve();
    let markResumed = (): void => {};
    let cycling = false;
    // GetRandom first: a guest that only read since its last durable checkpoint has nothing to save.
    // Then PCR_Extend: each cycle's state changed, so each makes a durable checkpoint.
    let loadCommand = (): Uint8Array => tpm2.getRandom(16);
    const startLoad = (): Promise<void> => (async () => {
      while (!stop) {
        try {
          await s.submit(loadCommand());
          answeredAt = performance.now();
          trace('bench answered');
          loadOurs++;
        } catch (err) {
          // Refused only while suspended; anything else is a failure, not something to spin on.
          if (!cycling) throw err;
          await resumed;
        }
      }
    })();
    let load = startLoad();
    load.catch(() => {});
    /** One cycle: as `xl save` (control/shutdown = suspend, the guest closes), then as a restore. */
    const cycle = async (): Promise<{ ms: number; t0: number }> => {
      resumed = new Promise((r) => (markResumed = r));
      cycling = true;
      const t0 = performance.now();
      trace('bench cycle');
      await dom0.write(`/local/domain/${domid}/control/shutdown`, 'suspend');
      const left = await s.suspend();
      trace('bench suspended');
      // The toolstack's two writes for the restore go out together.
      await Promise.all([dom0.write(`/local/domain/0/backend/vtpm/${domid}/0/resume`, 'True'), dom0.write(`/local/domain/${domid}/control/shutdown`, '')]);
      s = await GuestSession.open({ xs, dom, firstId: s.nextId, reconnect: true });
      for (const r of left) void s.resubmit(r);
      const ms = performance.now() - t0;
      trace('bench resumed');
      cycling = false;
      markResumed();
      return { ms, t0 };
    };
    for (let i = 0; i < cycles + warmup; i++) {
      await new Promise((r) => setTimeout(r, 20)); // let the load run between cycles
      const { ms, t0 } = await cycle();
      if (i < warmup) {
        if (i < COLD) oursCold.push(ms);
        continue;
      }
      ours.push(ms);
      // The load always has one GetRandom in flight: the backend answers it (after its checkpoint is
      // durable at the manager) before it acknowledges the suspend.
      saveWait.push(answeredAt > t0 && answeredAt < t0 + ms ? answeredAt - t0 : 0);
    }
    stop = true;
    await load;
    stop = false;
    loadCommand = () => tpm2.pcrExtendSha256(16, digest);
    load = startLoad();
    load.catch(() => {});
    for (let i = 0; i < cycles + COLD; i++) {
      await new Promise((r) => setTimeout(r, 20));
      const { ms } = await cycle();
      if (i >= COLD) oursExtend.push(ms);
    }
    stop = true;
    await load;
    // Idle: nothing in flight, so no manager save on the path at all. CPU per cycle per process
    // (every thread; the guest is this process) does not depend on what else the machine runs.
    const daemons = h.processes.filter((p) => p.role !== 'guest');
    let cpu0: number[] = [];
    let guest0 = process.cpuUsage();
    for (let i = 0; i < cycles + warmup; i++) {
      await new Promise((r) => setTimeout(r, 5));
      if (i === warmup) {
        cpu0 = daemons.map((p) => cpuMs(p.pid));
        guest0 = process.cpuUsage();
      }
      const { ms } = await cycle();
      if (i >= warmup) oursIdle.push(ms);
    }
    const guestCpu = process.cpuUsage(guest0);
    const perCycle = daemons.map((p, i) => `${p.role} ${((cpuMs(p.pid) - cpu0[i]!) / cycles).toFixed(2)}`);
    ctx.log(`ours idle: CPU ms per cycle ${perCycle.join(', ')}, guest (this process) ${((guestCpu.user + guestCpu.system) / 1000 / cycles).toFixed(2)}`);
    await s.close();
    await xs.close();
    await dom.destroy();
    await dom0.close();

    ctx.log(`ours done: p50 ${percentile(ours, 50).toFixed(2)} ms`);
    // ---- peer: swtpm --------------------------------------------------------------------------
    const dir = join(base, 'swtpm');
    fs.mkdirSync(dir);
    const sw = await SwtpmProcess.start({ dir });
    let data = await sw.connect();
    await data.transact(tpm2.getRandom(8));
    {
      const digest = new Uint8Array(32).fill(7);
      let n = 0;
      const t0 = performance.now();
      while (performance.now() < t0 + 1500) {
        await data.transact(tpm2.pcrExtendSha256(16, digest));
        n++;
      }
      peerRate = n / ((performance.now() - t0) / 1000);
    }
    const ctrl = await Ctrl.open(sw.ctrlPath);
    // The saved state goes to the disk our manager's store is on (same file system as base).
    const saveDir = join(base, 'swtpm-save');
    fs.mkdirSync(saveDir);
    let stopPeer = false;
    let paused: Promise<void> | null = null;
    let peerCommand = (): Uint8Array => tpm2.getRandom(16);
    const startPeerLoad = (): Promise<void> => (async () => {
      while (!stopPeer) {
        if (paused) await paused;
        // swtpm may drop the data connection across CMD_INIT: reconnect when an answer does not come.
        const ok = await Promise.race([data.transact(peerCommand()).then(() => true), new Promise<false>((r) => setTimeout(() => r(false), 500))]);
        if (ok) loadPeer++;
        else data = await sw.connect();
      }
    })();
    const peerCycle = async (): Promise<number> => {
      await new Promise((r) => setTimeout(r, 20));
      // swtpm serves one channel at a time per main loop turn; stop the data load at a command
      // boundary as QEMU does (the VM is paused before its TPM state is taken).
      let release!: () => void;
      paused = new Promise((r) => (release = r));
      await new Promise((r) => setTimeout(r, 0));
      const t0 = performance.now();
      await swtpmSaveRestore(ctrl, saveDir);
      const ms = performance.now() - t0;
      paused = null;
      release();
      return ms;
    };
    let loadP = startPeerLoad();
    for (let i = 0; i < cycles + warmup; i++) {
      const ms = await peerCycle();
      if (i >= warmup) peer.push(ms);
      else if (i < COLD) peerCold.push(ms);
    }
    stopPeer = true;
    await loadP;
    stopPeer = false;
    peerCommand = () => tpm2.pcrExtendSha256(16, digest);
    loadP = startPeerLoad();
    for (let i = 0; i < cycles + COLD; i++) {
      const ms = await peerCycle();
      if (i >= COLD) peerExtend.push(ms);
    }
    stopPeer = true;
    await loadP;
    for (let i = 0; i < cycles + warmup; i++) {
      await new Promise((r) => setTimeout(r, 5));
      const t0 = performance.now();
      await swtpmSaveRestore(ctrl, saveDir);
      if (i >= warmup) peerIdle.push(performance.now() - t0);
    }
    ctrl.close();
    await sw.stop();
  } finally {
    await run(process.execPath, [cli, 'host', 'down', '--run', runDir], { env }).catch(() => {});
    fs.rmSync(base, { recursive: true, force: true });
  }
  if (ctx.args.includes('--series')) {
    const row = (name: string, a: number[]): void => ctx.log(`${name}: ${a.map((v) => v.toFixed(2)).join(' ')}`);
    row('ours loaded ms', ours);
    row('ours save wait ms', saveWait);
    row('ours idle ms', oursIdle);
    row('swtpm loaded ms', peer);
    row('ours extend-loaded ms', oursExtend);
    row('swtpm extend-loaded ms', peerExtend);
  }
  ctx.log(`ours: ${ours.length} cycles, ${loadOurs} GetRandom answered meanwhile; swtpm: ${peer.length} cycles, ${loadPeer} GetRandom`);
  const note = `${cycles} cycles under a GetRandom loop (reads only: no new state to save at the suspend); swtpm 0.7.1 GET_STATEBLOB×3 to files + fdatasync, STOP, SET_STATEBLOB×3 from them, INIT`;
  const minusSave = ours.map((ms, i) => ms - saveWait[i]!);
  ctx.log(`ours under load: save wait p50 ${percentile(saveWait, 50).toFixed(2)} ms, the rest p50 ${percentile(minusSave, 50).toFixed(2)} ms`);
  return [
    { id: 'cycle_p50', unit: 'ms', ours: percentile(ours, 50), peer: percentile(peer, 50), note, target: { on: 'ratio', op: '<=', value: 1 } },
    { id: 'cycle_p99', unit: 'ms', ours: percentile(ours, 99), peer: percentile(peer, 99), note },
    {
      id: 'cycle_extend_p50',
      unit: 'ms',
      ours: percentile(oursExtend, 50),
      peer: percentile(peerExtend, 50),
      note: `${cycles} cycles under a PCR_Extend loop: every cycle of ours makes a durable checkpoint (under GetRandom alone there is nothing new to save); swtpm the same save + restore`,
      target: { on: 'ratio', op: '<=', value: 1 },
    },
    {
      id: 'cycle_save_wait_p50',
      unit: 'ms',
      ours: percentile(saveWait, 50),
      peer: percentile(peer, 50),
      note: 'part of each loaded cycle spent waiting for the in-flight command, i.e. its checkpoint at the manager; peer: swtpm cycle',
    },
    { id: 'cycle_minus_save_p50', unit: 'ms', ours: percentile(minusSave, 50), peer: percentile(peer, 50), note: 'loaded cycle minus that wait; peer: swtpm cycle' },
    { id: 'once_extend_per_s_1', unit: 'cmd/s', ours: onceRate1, peer: peerRate, note: 'one guest, ring, one PCR_Extend at a time (a checkpoint each); swtpm socket back to back' },
    { id: 'once_extend_per_s_16', unit: 'cmd/s', ours: onceRate16, peer: peerRate, note: 'one guest, ring, 16 outstanding (group commit); swtpm socket back to back' },
    {
      id: 'cycle_cold_p50',
      unit: 'ms',
      ours: percentile(oursCold, 50),
      peer: percentile(peerCold, 50),
      note: `first ${COLD} loaded cycles of a fresh host (V8 not yet warm; the figures above skip ${warmup}); swtpm's first ${COLD}`,
      target: { on: 'ours', op: '<=', value: 5 },
    },
    {
      id: 'cycle_cold_p99',
      unit: 'ms',
      ours: percentile(oursCold, 99),
      peer: percentile(peerCold, 99),
      note: `first ${COLD} loaded cycles of a fresh host; swtpm's first ${COLD}`,
    },
    { id: 'cycle_idle_p50', unit: 'ms', ours: percentile(oursIdle, 50), peer: percentile(peerIdle, 50), note: `${cycles} cycles, nothing in flight (no manager save on the path); swtpm idle too` },
  ];
}

export { run_ as run };
