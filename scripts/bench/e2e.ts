// `npm run bench -- e2e [--mode single|multi] [--protocol v2|ring] [--quick]`: the whole path a guest's command takes —
// TpmFront → ring (grant-mapped page + event channel) → backend process → libtpms — against the same
// client talking to swtpm over its UNIX socket, in the same run. Then aggregate PCR_Extend/s with 1,
// 16 and 256 guests (one outstanding command each) against as many swtpm processes driven alike, and
// memory per guest (the backend's PSS growth per guest vs a swtpm process's PSS). A v2 run then adds
// the exactly-once ring beside it: getrandom_rtt_p50_ring and extend_per_s_256_ring, same peers.
import fs from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import { hostDown, hostUp } from '../../src/cli/host.js';
import { RunDir } from '../../src/cli/rundir.js';
import { Domain } from '../../src/xen/index.js';
import { connect, type XsClient } from '../../src/xenstore/client.js';
import { writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { TpmFront } from '../../src/frontend/tpmfront.js';
import { SwtpmProcess } from './_swtpm.js';
import { smapsRollup } from './_engine-host.js';
import { cpuUs, median, percentile, pin, placedMedians, settle, usSince, type BenchContext, type Figure } from './lib.js';

const GET_RANDOM_8 = new Uint8Array([0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8]);
const STARTUP_CLEAR = new Uint8Array([0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]);

function pcrExtend(pcr: number, digest: Uint8Array): Uint8Array {
  const b = Buffer.alloc(10 + 4 + 4 + 9 + 4 + 2 + 32);
  b.writeUInt16BE(0x8002, 0);
  b.writeUInt32BE(b.length, 2);
  b.writeUInt32BE(0x182, 6);
  b.writeUInt32BE(pcr, 10);
  b.writeUInt32BE(9, 14);
  b.writeUInt32BE(0x40000009, 18);
  b.writeUInt32BE(1, 27);
  b.writeUInt16BE(0x000b, 31);
  Buffer.from(digest).copy(b, 33);
  return new Uint8Array(b);
}

interface Client {
  transmit(cmd: Uint8Array): Promise<Uint8Array>;
}

/** CPU µs used by this process and `pids` during `f`, added to `acc.us`; `acc.n` counts commands. */
async function cpuOf<T>(acc: { us: number; n: number }, pids: number[], n: number, f: () => Promise<T>): Promise<T> {
  const before = cpuUs('self') + pids.reduce((a, p) => a + cpuUs(p), 0);
  const r = await f();
  acc.us += cpuUs('self') + pids.reduce((a, p) => a + cpuUs(p), 0) - before;
  acc.n += n;
  return r;
}

async function latencies(c: Client, cmd: () => Uint8Array, n: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const command = cmd();
    const t0 = process.hrtime.bigint();
    const r = await c.transmit(command);
    out.push(usSince(t0));
    if (r.length < 10 || r[6]! | r[7]! | r[8]! | r[9]!) throw new Error(`command failed: ${Buffer.from(r.subarray(0, 10)).toString('hex')}`);
  }
  return out;
}

/**
 * Every client runs PCR_Extend back to back for `ms`; returns commands per second in all. Only PCRs 16
 * and 23 take an extend at locality 0 (17-22 answer TPM_RC_LOCALITY, a cheaper error path), and every
 * answer is checked, so both sides are measured doing the extend.
 */
async function aggregate(clients: Client[], ms: number): Promise<number> {
  const digest = randomBytes(32);
  const until = Date.now() + ms;
  let n = 0;
  const t0 = process.hrtime.bigint();
  await Promise.all(
    clients.map(async (c, i) => {
      const cmd = pcrExtend(i % 2 ? 23 : 16, digest);
      while (Date.now() < until) {
        const r = await c.transmit(cmd);
        if (r.length < 10 || r[6]! | r[7]! | r[8]! | r[9]!) throw new Error(`PCR_Extend failed: ${Buffer.from(r.subarray(0, 10)).toString('hex')}`);
        n++;
      }
    }),
  );
  return n / (usSince(t0) / 1e6);
}

/** Domids of the ring guests a v2 run adds (above the v2 guests' 1..256). */
const RING_DOMID_BASE = 1001;

interface Guest {
  dom: Domain;
  xs: XsClient;
  front: TpmFront;
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const quick = ctx.args.includes('--quick');
  const modeArg = ctx.args[ctx.args.indexOf('--mode') + 1];
  const mode = ctx.args.includes('--mode') && modeArg === 'multi' ? 'multi' : 'single';
  // v2 (the tpmif page, one command at a time) or ring (multi-request, exactly-once: every command
  // checkpoints the vTPM's volatile state and its answer at the manager before it is published).
  const protocol = ctx.args.includes('--protocol') && ctx.args[ctx.args.indexOf('--protocol') + 1] === 'ring' ? 'ring' : 'v2';
  const sfx = protocol === 'ring' ? '_ring' : '';
  const counts = quick ? [1, 16, 64] : [1, 16, 256];
  const maxN = counts[counts.length - 1]!;
  const nRtt = quick ? 500 : 3000;
  const tputMs = quick ? 1500 : 3000;
  const work = fs.mkdtempSync(join(os.tmpdir(), 'vtpm-bench-e2e-'));
  const runDir = join(work, 'run');
  const guests: Guest[] = [];
  const swtpms: SwtpmProcess[] = [];
  const swClients: Array<Client & { close(): void }> = [];
  let xs0: XsClient | null = null;
  try {
    const h = await hostUp(runDir, join(work, 'state'), mode);
    const backendPid = h.processes.find((p) => p.role === 'backend')!.pid;
    ctx.log(`host up (${mode}-VM mode, ${protocol} transport); backend pid ${backendPid}`);
    xs0 = await connect(h.xenstoredSocket);
    const base = smapsRollup(backendPid);

    const addGuest = async (domid: number, pollUs?: number, backendKeys: Record<string, string> = {}, proto: 'v2' | 'ring' = protocol): Promise<Guest> => {
      await xs0!.introduce(domid);
      await writeDeviceDirectories(xs0!, { frontDomid: domid, backDomid: 0, devid: 0, uuid: randomUUID(), extra: { backend: { 'tpm-version': '2.0', ...backendKeys } } });
      const dom = await Domain.create({ domid, dir: h.xenDir, geometry: { nrPages: 40 } });
      const xs = await connect(join(h.domainSocketDir, `dom${domid}.sock`));
      const front = await TpmFront.connect({ xs, dom, protocol: proto, timeoutMs: 60_000, pollUs });
      await front.transmit(STARTUP_CLEAR);
      const g = { dom, xs, front };
      guests.push(g);
      return g;
    };
    const addSwtpm = async (): Promise<void> => {
      const s = await SwtpmProcess.start({ dir: fs.mkdtempSync(join(work, 'swtpm-')) });
      swtpms.push(s);
      const conn = await s.connect();
      swClients.push({ transmit: (c) => conn.transact(c), close: () => conn.close() });
    };

    // Round trips: one guest, one swtpm, same commands, alternating rounds. Both ends of our ring
    // busy-poll for a short adaptive window (src/xen/poll.ts); a second guest whose frontend never
    // polls (it sleeps on its event channel like a socket client) shows what the polling buys, and the
    // CPU time of client + backend (client + swtpm for the peer) per command shows what it costs.
    await addGuest(1);
    await addSwtpm();
    await addGuest(2, 0);
    const ours: Client = guests[0]!.front;
    const sleeper: Client = guests[1]!.front;
    const peer: Client = swClients[0]!;
    const swPid = swtpms[0]!.pid;
    await settle(ctx);
    await latencies(ours, () => GET_RANDOM_8, 300);
    await latencies(sleeper, () => GET_RANDOM_8, 300);
    await latencies(peer, () => GET_RANDOM_8, 300);
    const rtt = { gr: [[], [], []] as number[][], ex: [[], []] as number[][] };
    const cpu = { ours: { us: 0, n: 0 }, sleeper: { us: 0, n: 0 }, peer: { us: 0, n: 0 } };
    const k = nRtt / 4;
    for (let round = 0; round < 4; round++) {
      rtt.gr[0]!.push(...(await cpuOf(cpu.ours, [backendPid], k, () => latencies(ours, () => GET_RANDOM_8, k))));
      rtt.gr[1]!.push(...(await cpuOf(cpu.peer, [swPid], k, () => latencies(peer, () => GET_RANDOM_8, k))));
      rtt.gr[2]!.push(...(await cpuOf(cpu.sleeper, [backendPid], k, () => latencies(sleeper, () => GET_RANDOM_8, k))));
      rtt.ex[0]!.push(...(await latencies(ours, () => pcrExtend(16, randomBytes(32)), k)));
      rtt.ex[1]!.push(...(await latencies(peer, () => pcrExtend(16, randomBytes(32)), k)));
    }
    ctx.log(`GetRandom p50 ours ${median(rtt.gr[0]!).toFixed(1)} µs, swtpm ${median(rtt.gr[1]!).toFixed(1)} µs`);

    // The cost of a capture (`guest attach --pcap`, docs/observability.md): two guests attached alike,
    // one whose backend writes every command, response and ring event to a pcapng file and one without,
    // warmed up alike and measured in small batches, alternating. Small batches make both see the same
    // conditions: when CPU pressure makes the polls stand down for a while, that moves both medians,
    // where long batches gave it to whichever guest it happened to fall on.
    const captured: Client = (await addGuest(3, undefined, { capture: join(work, 'capture.pcapng'), 'capture-max-mb': '1000' })).front;
    const plain: Client = (await addGuest(4)).front;
    await latencies(captured, () => GET_RANDOM_8, 300);
    await latencies(plain, () => GET_RANDOM_8, 300);
    const cap = { plain: [] as number[], captured: [] as number[], plainEx: [] as number[], capturedEx: [] as number[] };
    const batch = 50;
    for (let round = 0; round < (4 * k) / batch; round++) {
      const pair = round % 2 ? ([captured, plain] as const) : ([plain, captured] as const);
      for (const c of pair) (c === plain ? cap.plain : cap.captured).push(...(await latencies(c, () => GET_RANDOM_8, batch)));
      for (const c of pair) (c === plain ? cap.plainEx : cap.capturedEx).push(...(await latencies(c, () => pcrExtend(16, randomBytes(32)), batch)));
    }
    ctx.log(`GetRandom p50 with a capture ${median(cap.captured).toFixed(1)} µs, without ${median(cap.plain).toFixed(1)} µs`);
    ctx.log(`PCR_Extend p50 ours ${median(rtt.ex[0]!).toFixed(1)} µs, swtpm ${median(rtt.ex[1]!).toFixed(1)} µs`);

    const figures: Figure[] = [
      { id: `getrandom_rtt_p50${sfx}`, unit: 'µs', ours: median(rtt.gr[0]!), peer: median(rtt.gr[1]!), note: 'swtpm UNIX socket; our ends poll (≤ 50 µs window)' },
      { id: `getrandom_rtt_p99${sfx}`, unit: 'µs', ours: percentile(rtt.gr[0]!, 99), peer: percentile(rtt.gr[1]!, 99), note: 'swtpm UNIX socket' },
      { id: `extend_rtt_p50${sfx}`, unit: 'µs', ours: median(rtt.ex[0]!), peer: median(rtt.ex[1]!), note: 'swtpm UNIX socket' },
      { id: `extend_rtt_p99${sfx}`, unit: 'µs', ours: percentile(rtt.ex[0]!, 99), peer: percentile(rtt.ex[1]!, 99), note: 'swtpm UNIX socket' },
      {
        id: `getrandom_rtt_p50_front_sleeps${sfx}`,
        unit: 'µs',
        ours: median(rtt.gr[2]!),
        peer: median(rtt.gr[1]!),
        note: 'ours with a frontend that never polls (pollUs 0)',
      },
      {
        id: `getrandom_cpu_per_cmd${sfx}`,
        unit: 'µs',
        ours: cpu.ours.us / cpu.ours.n,
        peer: cpu.peer.us / cpu.peer.n,
        note: 'CPU of client + backend (ours) or client + swtpm, per GetRandom round trip',
      },
      {
        id: `getrandom_cpu_per_cmd_front_sleeps${sfx}`,
        unit: 'µs',
        ours: cpu.sleeper.us / cpu.sleeper.n,
        peer: cpu.peer.us / cpu.peer.n,
        note: 'as above, frontend not polling',
      },
    ];

    figures.push(
      { id: `getrandom_rtt_p50_captured${sfx}`, unit: 'µs', ours: median(cap.captured), peer: median(cap.plain), note: 'a guest with a --pcap capture vs one without, attached alike, alternating batches of 50; the capture may cost at most 10 %', target: { on: 'ratio', op: '<=', value: 1.1 } },
      { id: `extend_rtt_p50_captured${sfx}`, unit: 'µs', ours: median(cap.capturedEx), peer: median(cap.plainEx), note: 'as above, PCR_Extend', target: { on: 'ratio', op: '<=', value: 1.1 } },
    );

    // GetRandom round trips of a front and swtpm with both sides pinned alike (docs/benchmarks.md, "Why the
    // peer's figure moves"): the unpinned figures are whatever placement the scheduler chose in this run.
    const placedGetRandom = async (front: Client, id: string, what: string): Promise<void> => {
      const rtt = (c: Client) => (n: number) => latencies(c, () => GET_RANDOM_8, n);
      const placed = await placedMedians(ctx, { clients: [process.pid], ours: { servers: [backendPid], rtt: rtt(front) }, peer: { servers: [swPid], rtt: rtt(peer) } }, nRtt / 2);
      for (const [where, m] of placed) {
        figures.push({ id: `${id}_${where}`, unit: 'µs', ours: m.ours, peer: m.peer, note: `${what}client and server ${where === 'apart' ? 'on different vCPUs' : 'on one vCPU'}, both sides pinned alike` });
      }
    };
    await placedGetRandom(ours, `getrandom_rtt_p50${sfx}`, '');

    for (const n of counts) {
      const t0 = Date.now();
      while (guests.length < n) await addGuest(guests.length + 1);
      while (swtpms.length < n) await addSwtpm();
      ctx.log(`${n} guests and ${n} swtpm processes ready (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
      const o = await aggregate(guests.slice(0, n).map((g) => g.front), tputMs);
      const p = await aggregate(swClients.slice(0, n), tputMs);
      ctx.log(`PCR_Extend/s with ${n}: ours ${o.toFixed(0)}, swtpm ${p.toFixed(0)}`);
      figures.push({ id: `extend_per_s_${n}${sfx}`, unit: 'cmd/s', ours: o, peer: p, note: `${n} swtpm processes` });
    }

    const after = smapsRollup(backendPid);
    const swPss = swtpms.reduce((a, s) => a + smapsRollup(s.pid).pssKiB, 0);
    figures.push({
      id: `pss_per_guest_${maxN}${sfx}`,
      unit: 'MiB',
      ours: (after.pssKiB - base.pssKiB) / 1024 / maxN,
      peer: swPss / 1024 / maxN,
      note: 'backend PSS growth per guest vs swtpm PSS',
    });
    if (protocol === 'v2') {
      // The exactly-once ring beside it (#19): GetRandom round trip and PCR_Extend/s with maxN ring
      // guests, against the same swtpm peers in the same run.
      const ring: Guest[] = [await addGuest(RING_DOMID_BASE, undefined, {}, 'ring')];
      const r0: Client = ring[0]!.front;
      // After the 256-guest throughput run, as before the v2 round trips: its CPU pressure lingers in
      // the kernel's 10 s average, and both ring ends' polling stands down while it does.
      await settle(ctx);
      await latencies(r0, () => GET_RANDOM_8, 300);
      const gr: number[][] = [[], []];
      for (let round = 0; round < 4; round++) {
        gr[0]!.push(...(await latencies(r0, () => GET_RANDOM_8, k)));
        gr[1]!.push(...(await latencies(peer, () => GET_RANDOM_8, k)));
      }
      ctx.log(`ring GetRandom p50 ours ${median(gr[0]!).toFixed(1)} µs, swtpm ${median(gr[1]!).toFixed(1)} µs`);
      figures.push({ id: 'getrandom_rtt_p50_ring', unit: 'µs', ours: median(gr[0]!), peer: median(gr[1]!), note: 'ring transport, exactly-once; swtpm UNIX socket', target: { on: 'ratio', op: '<=', value: 1 } });
      await placedGetRandom(r0, 'getrandom_rtt_p50_ring', 'ring transport; ');
      // What a shared vCPU costs in CPU: two polling ends that spun out their windows in turn burnt ~10×
      // swtpm's CPU per round trip there (docs/exactly-once.md "Round trips").
      const undo = pin('shared', [process.pid], [backendPid, swPid]);
      if (undo) {
        try {
          const sc = { ours: { us: 0, n: 0 }, peer: { us: 0, n: 0 } };
          await latencies(r0, () => GET_RANDOM_8, 200);
          await latencies(peer, () => GET_RANDOM_8, 200);
          const half = Math.floor(k / 2);
          for (let round = 0; round < 4; round++) {
            await cpuOf(sc.ours, [backendPid], half, () => latencies(r0, () => GET_RANDOM_8, half));
            await cpuOf(sc.peer, [swPid], half, () => latencies(peer, () => GET_RANDOM_8, half));
          }
          figures.push({ id: 'getrandom_cpu_per_cmd_ring_shared', unit: 'µs', ours: sc.ours.us / sc.ours.n, peer: sc.peer.us / sc.peer.n, note: 'CPU of client + backend (ours) or client + swtpm per ring GetRandom, all on one vCPU' });
        } finally {
          undo();
        }
      }
      while (ring.length < maxN) ring.push(await addGuest(RING_DOMID_BASE + ring.length, undefined, {}, 'ring'));
      // CPU per extend of everything that serves it: this process's fronts (clients), the backend and the
      // manager (which holds every checkpoint), against the clients and the swtpm processes.
      const managerPid = h.processes.find((q) => q.role === 'manager')!.pid;
      const cpuNow = (pids: number[]): number => cpuUs('self') + pids.reduce((a, q) => a + cpuUs(q), 0);
      const perExtend = async (clients: Client[], pids: number[]): Promise<{ rate: number; cpuUs: number }> => {
        const c0 = cpuNow(pids);
        const t0 = process.hrtime.bigint();
        const rate = await aggregate(clients, tputMs);
        return { rate, cpuUs: (cpuNow(pids) - c0) / (rate * (usSince(t0) / 1e6)) };
      };
      // For the log: each process's CPU per extend, every thread counted (libuv pool threads included).
      const threadsUs = (pid: number | 'self'): number =>
        fs.readdirSync(`/proc/${pid}/task`).reduce((a, t) => {
          try {
            return a + Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]) / 1000;
          } catch {
            return a; // a thread that ended meanwhile
          }
        }, 0);
      const roles: Array<[string, number | 'self']> = [['clients', 'self'], ['backend', backendPid], ['manager', managerPid]];
      const split0 = roles.map(([, q]) => threadsUs(q));
      const t1 = process.hrtime.bigint();
      const o = await perExtend(ring.map((g) => g.front), [backendPid, managerPid]);
      const extends_ = o.rate * (usSince(t1) / 1e6);
      const split = roles.map(([role, q], i) => `${role} ${((threadsUs(q) - split0[i]!) / extends_).toFixed(1)}`).join(', ');
      const p = await perExtend(swClients.slice(0, maxN), swtpms.slice(0, maxN).map((s) => s.pid));
      ctx.log(`ring PCR_Extend/s with ${maxN}: ours ${o.rate.toFixed(0)}, swtpm ${p.rate.toFixed(0)}; CPU per extend ${o.cpuUs.toFixed(1)} vs ${p.cpuUs.toFixed(1)} µs (ours, all threads: ${split} µs)`);
      figures.push(
        { id: `extend_per_s_${maxN}_ring`, unit: 'cmd/s', ours: o.rate, peer: p.rate, note: `ring transport, exactly-once; ${maxN} swtpm processes`, ...(maxN === 256 ? { target: { on: 'ratio', op: '>=', value: 1.5 } } : {}) },
        { id: `extend_cpu_per_cmd_${maxN}_ring`, unit: 'µs', ours: o.cpuUs, peer: p.cpuUs, note: 'CPU of clients + backend + manager (ours) or clients + swtpm processes, per PCR_Extend' },
      );
    }

    return figures;
  } finally {
    for (const c of swClients) c.close();
    await Promise.all(swtpms.map((s) => s.stop().catch(() => {})));
    for (const g of guests) {
      await g.front.close().catch(() => {});
      await g.xs.close().catch(() => {});
      await g.dom.destroy().catch(() => {});
    }
    await xs0?.close().catch(() => {});
    if (fs.existsSync(new RunDir(runDir).hostJson)) await hostDown(runDir).catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }
}
