// Child process of the engine bench: hosts N TPM 2.0 instances (each powered on, started and asked
// one GetRandom), then prints its own memory from /proc/self/smaps_rollup as one JSON line and waits
// for stdin to close. Run with UV_THREADPOOL_SIZE from engineEnv().
import { readFileSync } from 'node:fs';
import { DirStateStore } from '../../src/tpm/dir-store.js';
import { TpmHost } from '../../src/tpm/host.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';

export function smapsRollup(pid: number | 'self' = 'self'): { rssKiB: number; pssKiB: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN);
  return { rssKiB: field('Rss'), pssKiB: field('Pss') };
}

async function main(): Promise<void> {
  const n = Number(process.argv[2]);
  const store = await DirStateStore.open(process.argv[3]!);
  const before = smapsRollup();
  // No spares: the figure is memory per instance, and a spare is not an instance.
  const host = new TpmHost({ spares: 0 });
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const tpm = await host.create({ instance: i, version: '2.0', store, startup: 'clear' });
    tpm2.parseGetRandom(await tpm.execute(tpm2.getRandom(8)));
  }
  const createMs = performance.now() - t0;
  const after = smapsRollup();
  process.stdout.write(JSON.stringify({ n, before, after, createMs }) + '\n');
  process.stdin.resume();
  process.stdin.on('end', () => void host.destroyAll().then(() => process.exit(0)));
}

if (process.argv[1]?.endsWith('_engine-host.js')) void main();
