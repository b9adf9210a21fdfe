// `npm run bench -- multivm [--guests N] [--samples N] [--only multi|stubdom]`: multi-VM and stub-domain mode next to single-VM
// mode next to swtpm, in the same run.
//  - GetRandom(8) round trip as a guest sees it: TpmFront (ring protocol) → grant-mapped ring → backend
//    → (multi: a second ring → the vTPM-domain process) → libtpms, and back; stubdom: the guest's
//    ring → its vTPM domain (the device's backend) → libtpms. Peer: the same command
//    over a persistent UNIX data socket to a `swtpm socket` process (one per guest).
//  - Memory per guest: the dom0 processes that hold the vTPMs, PSS from /proc/PID/smaps_rollup, summed
//    and divided by the guests: single = the backend; multi = the backend + every vTPM domain; peer =
//    N swtpm processes; stubdom = the backend (lifecycle only) + every vTPM domain. The manager and xenstored are the same in both modes and left out.
// Each host is a real `host up` (xenstored, manager, backend as processes); the guests are frontend
// domains in this process.
import { randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hostDown, hostUp } from '../../src/cli/host.js';
import { RunDir } from '../../src/cli/rundir.js';
import { Domain } from '../../src/xen/index.js';
import { connect, type XsClient } from '../../src/xenstore/client.js';
import { type VtpmDevice } from '../../src/xenstore/xenbus.js';
import { removeDeviceDirectories, writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { removeStubdom, requestStubdom } from '../../src/cli/stubdom.js';
import { TpmFront } from '../../src/frontend/tpmfront.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { smapsRollup } from './_engine-host.js';
import { SwtpmProcess } from './_swtpm.js';
import { median, percentile, settle, usSince, type BenchContext, type Figure } from './lib.js';

function arg(ctx: BenchContext, name: string, dflt: number): number {
  const i = ctx.args.indexOf(`--${name}`);
  return i >= 0 && ctx.args[i + 1] ? Number(ctx.args[i + 1]) : dflt;
}

interface Result {
  rttP50Us: number;
  rttP99Us: number;
  pssPerGuestMiB: number;
}

const pssKiB = (pid: number): number => smapsRollup(pid).pssKiB;

/** A host in `mode` with `n` guests in this process; GetRandom round trips and dom0 PSS per guest. */
async function measureHost(mode: 'single' | 'multi' | 'stubdom', n: number, samples: number, ctx: BenchContext, protocol: 'ring' | 'v2' = 'ring'): Promise<Result> {
  const work = mkdtempSync(join(tmpdir(), `vtpm-bench-${mode}-`));
  const runDir = join(work, 'run');
  const h = await hostUp(runDir, join(work, 'state'), mode);
  const backendPid = h.processes.find((p) => p.role === 'backend')!.pid;
  const admin = await connect(h.xenstoredSocket);
  const guests: Array<{ dom: Domain; xs: XsClient; front: TpmFront; dev: VtpmDevice }> = [];
  try {
    for (let i = 1; i <= n; i++) {
      await admin.introduce(i);
      const vm = randomUUID();
      // Stub-domain mode: the guest's vTPM domain first, then the device with it as the backend.
      const back = mode === 'stubdom' ? await requestStubdom(admin, { fe: i, devid: 0, vm, version: '2.0', timeoutMs: 30_000 }) : 0;
      const dev = await writeDeviceDirectories(admin, { frontDomid: i, backDomid: back, uuid: vm, devid: 0, extra: { backend: { 'tpm-version': '2.0' } } });
      const dom = await Domain.create({ domid: i, dir: h.xenDir });
      const xs = await connect(join(h.domainSocketDir, `dom${i}.sock`));
      const front = await TpmFront.connect({ xs, dom, protocol, timeoutMs: 30_000 });
      await front.transmit(tpm2.startup(tpm2.TPM_SU_CLEAR));
      guests.push({ dom, xs, front, dev });
    }
    // Warm up every path, then sample round robin so every guest's vTPM is measured, once the start-up's
    // CPU pressure has left the kernel's 10 s average (polling stands down under pressure).
    for (const g of guests) for (let k = 0; k < 50; k++) await g.front.transmit(tpm2.getRandom(8));
    await settle(ctx);
    const rtt: number[] = [];
    for (let k = 0; k < samples; k++) {
      const g = guests[k % guests.length]!;
      const t0 = process.hrtime.bigint();
      tpm2.parseGetRandom(await g.front.transmit(tpm2.getRandom(8)));
      rtt.push(usSince(t0));
    }
    await sleep(200);
    let pss = pssKiB(backendPid);
    if (mode !== 'single') {
      const dir = new RunDir(runDir).vtpmDomainDir;
      const doms = readdirSync(dir).filter((f) => f.endsWith('.json'));
      if (doms.length !== n) throw new Error(`expected ${n} vTPM domains, found ${doms.length}`);
      for (const f of doms) pss += pssKiB((JSON.parse(readFileSync(join(dir, f), 'utf8')) as { pid: number }).pid);
    }
    ctx.log(`${mode} (${protocol}): ${n} guests, GetRandom p50 ${median(rtt).toFixed(1)} µs, dom0 PSS ${(pss / 1024).toFixed(1)} MiB`);
    return { rttP50Us: median(rtt), rttP99Us: percentile(rtt, 99), pssPerGuestMiB: pss / 1024 / n };
  } finally {
    for (const g of guests) {
      await g.front.close().catch(() => {});
      await removeDeviceDirectories(admin, g.dev).catch(() => {});
      if (mode === 'stubdom') await removeStubdom(admin, g.dev.frontDomid, 0).catch(() => {});
      await g.xs.close().catch(() => {});
      await g.dom.destroy().catch(() => {});
    }
    await admin.close().catch(() => {});
    await hostDown(runDir);
    rmSync(work, { recursive: true, force: true });
  }
}

/** The peer: one `swtpm socket` per guest, GetRandom over its data socket. */
async function measureSwtpm(n: number, samples: number, ctx: BenchContext): Promise<Result> {
  const work = mkdtempSync(join(tmpdir(), 'vtpm-bench-swtpm-'));
  const procs: SwtpmProcess[] = [];
  try {
    const conns = [];
    for (let i = 0; i < n; i++) {
      const dir = join(work, String(i));
      mkdirSync(dir);
      const sw = await SwtpmProcess.start({ dir });
      procs.push(sw);
      conns.push(await sw.connect());
    }
    for (const c of conns) for (let k = 0; k < 50; k++) await c.transact(tpm2.getRandom(8));
    const rtt: number[] = [];
    for (let k = 0; k < samples; k++) {
      const c = conns[k % conns.length]!;
      const t0 = process.hrtime.bigint();
      tpm2.parseGetRandom(await c.transact(tpm2.getRandom(8)));
      rtt.push(usSince(t0));
    }
    await sleep(200);
    const pss = procs.reduce((s, p) => s + pssKiB(p.pid), 0);
    for (const c of conns) c.close();
    ctx.log(`swtpm: ${n} processes, GetRandom p50 ${median(rtt).toFixed(1)} µs, PSS ${(pss / 1024).toFixed(1)} MiB`);
    return { rttP50Us: median(rtt), rttP99Us: percentile(rtt, 99), pssPerGuestMiB: pss / 1024 / n };
  } finally {
    await Promise.all(procs.map((p) => p.stop()));
    rmSync(work, { recursive: true, force: true });
  }
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const n = arg(ctx, 'guests', 8);
  const samples = arg(ctx, 'samples', 4000);
  // `--only multi|stubdom`: that mode and swtpm alone (a quicker A/B while working on one mode).
  const oi = ctx.args.indexOf('--only');
  const only = oi >= 0 ? ctx.args[oi + 1] : undefined;
  if (only !== undefined && only !== 'multi' && only !== 'stubdom') throw new Error(`--only takes multi or stubdom, not ${only}`);
  const single = only ? null : await measureHost('single', n, samples, ctx);
  const multi = only === 'stubdom' ? null : await measureHost('multi', n, samples, ctx);
  const stub = only === 'multi' ? null : await measureHost('stubdom', n, samples, ctx);
  const stubV2 = only === 'multi' ? null : await measureHost('stubdom', n, samples, ctx, 'v2');
  const sw = await measureSwtpm(n, samples, ctx);
  const peer = `swtpm socket ×${n}, UNIX data socket`;
  const figures: Figure[] = [];
  if (multi) figures.push({ id: 'getrandom_rtt_p50_multi', unit: 'µs', ours: multi.rttP50Us, peer: sw.rttP50Us, note: peer });
  if (single) figures.push({ id: 'getrandom_rtt_p50_single', unit: 'µs', ours: single.rttP50Us, peer: sw.rttP50Us, note: peer });
  if (multi && single) figures.push({ id: 'getrandom_rtt_p50_multi_vs_single', unit: 'µs', ours: multi.rttP50Us, peer: single.rttP50Us, note: 'our single-VM mode' });
  if (stub && stubV2) {
    figures.push(
      { id: 'getrandom_rtt_p50_stubdom', unit: 'µs', ours: stub.rttP50Us, peer: sw.rttP50Us, note: peer, target: { on: 'ratio', op: '<=', value: 1.5 } },
      { id: 'getrandom_rtt_p50_stubdom_v2', unit: 'µs', ours: stubV2.rttP50Us, peer: sw.rttP50Us, note: `${peer} (ours: v2 page, no request ids)` },
      { id: 'getrandom_rtt_p99_stubdom', unit: 'µs', ours: stub.rttP99Us, peer: sw.rttP99Us, note: peer },
    );
  }
  if (multi) {
    figures.push(
      { id: 'getrandom_rtt_p99_multi', unit: 'µs', ours: multi.rttP99Us, peer: sw.rttP99Us, note: peer },
      { id: 'pss_per_guest_multi', unit: 'MiB', ours: multi.pssPerGuestMiB, peer: sw.pssPerGuestMiB, note: `${n} swtpm processes`, ...(n === 8 ? { target: { on: 'ours', op: '<=', value: 12 } } : {}) },
    );
  }
  if (stub) figures.push({ id: 'pss_per_guest_stubdom', unit: 'MiB', ours: stub.pssPerGuestMiB, peer: sw.pssPerGuestMiB, note: `${n} swtpm processes` });
  if (single) figures.push({ id: 'pss_per_guest_single', unit: 'MiB', ours: single.pssPerGuestMiB, peer: sw.pssPerGuestMiB, note: `${n} swtpm processes` });
  if (multi && single) figures.push({ id: 'pss_per_guest_multi_vs_single', unit: 'MiB', ours: multi.pssPerGuestMiB, peer: single.pssPerGuestMiB, note: 'our single-VM mode' });
  return figures;
}
