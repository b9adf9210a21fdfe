// `npm run bench -- engine [--sizes 100,1000] [--swtpm-max N] [--samples N] [--ready-samples N]`
// The vTPM engine against swtpm, measured in the same run on this machine:
//  - memory per TPM at 100 and 1000 TPMs: one Node process hosting N libtpms copies (its RSS and PSS
//    from /proc/self/smaps_rollup, divided by N: Node's own ~40 MB included) vs N `swtpm socket`
//    processes (ΣRSS, ΣPSS over /proc/<pid>/smaps_rollup, divided by N);
//  - time to a ready TPM: ours = create (private copy, manufacture, power-on; or a spare TPM already
//    manufactured) + Startup + first GetRandom answered; swtpm = spawn until both sockets exist +
//    connect + first GetRandom answered;
//  - GetRandom and PCR_Extend latency: in-process execute() vs a round trip through swtpm's socket.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { DirStateStore } from '../../src/tpm/dir-store.js';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import { engineEnv } from '../../src/tpm/threadpool.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { smapsRollup } from './_engine-host.js';
import { SwtpmProcess } from './_swtpm.js';
import { median, usSince, type BenchContext, type Figure } from './lib.js';

const here = dirname(fileURLToPath(import.meta.url));

function arg(ctx: BenchContext, name: string, dflt: string): string {
  const i = ctx.args.indexOf(`--${name}`);
  return i >= 0 && ctx.args[i + 1] ? ctx.args[i + 1]! : dflt;
}

interface Mem {
  rssMiB: number;
  pssMiB: number;
}

/** Our N instances in a fresh child process; per-instance RSS/PSS (whole process / N). */
async function ourMemory(n: number, ctx: BenchContext): Promise<Mem & { createMs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-ours-'));
  const child = spawn(process.execPath, [join(here, '_engine-host.js'), String(n), dir], {
    stdio: ['pipe', 'pipe', 'inherit'],
    env: engineEnv(),
  });
  try {
    const line = await new Promise<string>((resolve, reject) => {
      createInterface({ input: child.stdout }).once('line', resolve);
      child.once('exit', (c) => reject(new Error(`engine host exited with ${c}`)));
    });
    const r = JSON.parse(line) as {
      before: { rssKiB: number; pssKiB: number };
      after: { rssKiB: number; pssKiB: number };
      createMs: number;
    };
    ctx.log(
      `ours n=${n}: process RSS ${(r.after.rssKiB / 1024).toFixed(1)} MiB, PSS ${(r.after.pssKiB / 1024).toFixed(1)} MiB ` +
        `(before instances: PSS ${(r.before.pssKiB / 1024).toFixed(1)} MiB; marginal PSS/instance ` +
        `${((r.after.pssKiB - r.before.pssKiB) / 1024 / n).toFixed(3)} MiB); created in ${(r.createMs / 1000).toFixed(1)} s`,
    );
    return { rssMiB: r.after.rssKiB / 1024 / n, pssMiB: r.after.pssKiB / 1024 / n, createMs: r.createMs };
  } finally {
    child.stdin.end();
    await new Promise((r) => child.once('exit', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** N swtpm processes, each ready and asked one GetRandom; ΣRSS/N and ΣPSS/N. */
async function swtpmMemory(n: number, ctx: BenchContext): Promise<Mem> {
  const root = mkdtempSync(join(tmpdir(), 'vtpm-bench-sw-'));
  const procs: SwtpmProcess[] = [];
  try {
    const t0 = performance.now();
    const batch = 8;
    for (let i = 0; i < n; i += batch) {
      await Promise.all(
        Array.from({ length: Math.min(batch, n - i) }, async (_, k) => {
          const dir = mkdtempSync(join(root, `${i + k}-`));
          const sw = await SwtpmProcess.start({ dir });
          procs.push(sw); // before anything else can fail, so finally{} stops it
          const c = await sw.connect();
          tpm2.parseGetRandom(await c.transact(tpm2.getRandom(8)));
          c.close();
        }),
      );
    }
    let rss = 0;
    let pss = 0;
    for (const p of procs) {
      const m = smapsRollup(p.pid);
      rss += m.rssKiB;
      pss += m.pssKiB;
    }
    ctx.log(
      `swtpm n=${n}: ΣRSS ${(rss / 1024).toFixed(1)} MiB, ΣPSS ${(pss / 1024).toFixed(1)} MiB; started in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    );
    return { rssMiB: rss / 1024 / n, pssMiB: pss / 1024 / n };
  } finally {
    await Promise.all(procs.map((p) => p.stop()));
    rmSync(root, { recursive: true, force: true });
  }
}

export async function run(ctx: BenchContext): Promise<Figure[]> {
  const sizes = arg(ctx, 'sizes', '100,1000').split(',').map(Number);
  const swtpmMax = Number(arg(ctx, 'swtpm-max', '1000'));
  const samples = Number(arg(ctx, 'samples', '2000'));
  const figures: Figure[] = [];
  const swVersion = 'swtpm 0.7.1 socket (unixio), libtpms 0.9.2';

  // Time to a ready TPM. Three ways of ours, sample by sample alternating with one swtpm start, so load
  // from elsewhere on the machine hits all alike:
  //  - ready_ms: a host with `spares: 1`, its spare made before the sample starts (warm: the host
  //    refills when idle, and a backend creates TPMs far apart compared with the ~3 ms a refill takes);
  //  - ready_ms_cold: a host without spares: load a library copy and manufacture on demand;
  //  - ready_ms_tmpfs_store: as ready_ms with the directory store on /dev/shm (fdatasync costs nothing there).
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-lat-'));
  const shmDir = mkdtempSync('/dev/shm/vtpm-bench-');
  const host = new TpmHost({ spares: 1 });
  const cold = new TpmHost();
  const store = await DirStateStore.open(join(dir, 'ours'));
  const shm = await DirStateStore.open(shmDir);
  try {
    const readyRounds = Number(arg(ctx, 'ready-samples', '30'));
    const oursReady: number[] = [];
    const coldReady: number[] = [];
    const shmReady: number[] = [];
    const swReady: number[] = [];
    const ready = async (h: TpmHost, instance: number, st: DirStateStore, out: number[]): Promise<void> => {
      await h.sparesReady();
      // A quiet moment, so the sample does not start while the refill's last callbacks run.
      await new Promise((r) => setTimeout(r, 5));
      const t0 = performance.now();
      // As the backend creates its instances (single-vm.ts): constant-time commands run in line.
      const tpm = await h.create({ instance, version: '2.0', store: st, startup: 'clear', inline: 'fast' });
      tpm2.parseGetRandom(await tpm.execute(tpm2.getRandom(8)));
      out.push(performance.now() - t0);
      await h.destroy(instance);
    };
    for (let i = 0; i < readyRounds; i++) {
      await ready(host, 1000 + i, store, oursReady);
      await ready(cold, 2000 + i, store, coldReady);
      await ready(host, 3000 + i, shm, shmReady);

      const swDir = mkdtempSync(join(dir, `sw${i}-`));
      const t0 = performance.now();
      const sw = await SwtpmProcess.start({ dir: swDir });
      const c = await sw.connect();
      tpm2.parseGetRandom(await c.transact(tpm2.getRandom(8)));
      swReady.push(performance.now() - t0);
      c.close();
      await sw.stop();
    }
    const n = `median of ${readyRounds}`;
    figures.push({
      id: 'ready_ms',
      unit: 'ms',
      ours: median(oursReady),
      peer: median(swReady),
      note: `${n}; host spares: 1 (warm); ours syncs state before answering (dir store, one fdatasync, same disk), swtpm 0.7.1 does not; inline 'fast' as the backend`,
    });
    figures.push({ id: 'ready_ms_cold', unit: 'ms', ours: median(coldReady), peer: median(swReady), note: `${n}; no spares: manufacture on demand; swtpm as above` });
    figures.push({ id: 'ready_ms_tmpfs_store', unit: 'ms', ours: median(shmReady), peer: median(swReady), note: `${n}; spares: 1, store on /dev/shm; swtpm as above` });
    await cold.destroyAll();

    // Latency, one command at a time.
    const tpm: TpmInstance = await host.create({ instance: 1, version: '2.0', store, startup: 'clear' });
    const swDir = mkdtempSync(join(dir, 'swlat-'));
    const sw = await SwtpmProcess.start({ dir: swDir });
    const c = await sw.connect();
    // Ours and the peer alternate sample by sample, so load from elsewhere on the machine hits both alike.
    const fast = await host.create({ instance: 2, version: '2.0', store, startup: 'clear', inline: 'fast' });
    const measure = async (cmd: () => Uint8Array, tpm: TpmInstance): Promise<[number, number]> => {
      const ours: number[] = [];
      const peer: number[] = [];
      for (let i = 0; i < 200; i++) {
        await tpm.execute(cmd());
        await c.transact(cmd());
      }
      for (let i = 0; i < samples; i++) {
        const a = cmd();
        const b = cmd();
        let t0 = process.hrtime.bigint();
        await tpm.execute(a);
        ours.push(usSince(t0));
        t0 = process.hrtime.bigint();
        await c.transact(b);
        peer.push(usSince(t0));
      }
      return [median(ours), median(peer)];
    };
    const digest = new Uint8Array(32).fill(7);
    const [oursRandom, swRandom] = await measure(() => tpm2.getRandom(16), tpm);
    const [oursExtend, swExtend] = await measure(() => tpm2.pcrExtendSha256(16, digest), tpm);
    const [fastRandom, swRandom2] = await measure(() => tpm2.getRandom(16), fast);
    const [fastExtend, swExtend2] = await measure(() => tpm2.pcrExtendSha256(16, digest), fast);
    figures.push({ id: 'extend_us', unit: 'µs', ours: oursExtend, peer: swExtend, note: `PCR_Extend(sha256) median of ${samples}; swtpm socket round trip` });
    figures.push({ id: 'getrandom_us', unit: 'µs', ours: oursRandom, peer: swRandom, note: `GetRandom(16) median of ${samples}` });
    figures.push({ id: 'extend_inline_us', unit: 'µs', ours: fastExtend, peer: swExtend2, note: "as extend_us, host option inline: 'fast'" });
    figures.push({ id: 'getrandom_inline_us', unit: 'µs', ours: fastRandom, peer: swRandom2, note: "as getrandom_us, inline: 'fast'" });
    c.close();
    await sw.stop();
  } finally {
    await host.destroyAll();
    await cold.destroyAll();
    rmSync(dir, { recursive: true, force: true });
    rmSync(shmDir, { recursive: true, force: true });
  }
  // Memory (last: tearing down 1000 swtpm processes would disturb the latency figures).
  for (const n of sizes) {
    const ours = await ourMemory(n, ctx);
    const swN = Math.min(n, swtpmMax);
    const sw = await swtpmMemory(swN, ctx);
    const sampled = swN < n ? ` (sampled ${swN} processes)` : '';
    figures.push({ id: `pss_per_instance_${n}`, unit: 'MiB', ours: ours.pssMiB, peer: sw.pssMiB, note: `${n} × ${swVersion}, ΣPSS/N${sampled}; ours without spares` });
    figures.push({ id: `rss_per_instance_${n}`, unit: 'MiB', ours: ours.rssMiB, peer: sw.rssMiB, note: `${n} × swtpm, ΣRSS/N${sampled}; ours without spares` });
  }

  return figures;
}
