// `vtpm ring-demo`: two guests and a backend as three processes sharing ring pages through the grant
// table: 50 000 echo requests each, then one guest lies about its ring indices and is cut off while
// the other keeps being served. `npm start` runs it until the vTPM demo replaces it.
import type { Command } from 'commander';
import { fork, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const peerScript = join(dirname(fileURLToPath(import.meta.url)), 'ring-peer.js');

interface Msg {
  kind: string;
  [k: string]: unknown;
}

function start(args: string[], env: NodeJS.ProcessEnv): { proc: ChildProcess; next: (k: string) => Promise<Msg> } {
  const proc = fork(peerScript, args, { env });
  const inbox: Msg[] = [];
  const waiters: Array<[string, (m: Msg) => void]> = [];
  proc.on('message', (m: Msg) => {
    const i = waiters.findIndex(([k]) => k === m.kind || m.kind === 'error');
    if (i >= 0) waiters.splice(i, 1)[0]![1](m);
    else inbox.push(m);
  });
  const next = (k: string): Promise<Msg> => {
    const i = inbox.findIndex((m) => m.kind === k);
    if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0]!);
    return new Promise((r) => waiters.push([k, r]));
  };
  return { proc, next };
}

export async function ringDemo(): Promise<void> {
  const dir = mkdtempSync('/dev/shm/vtpm-demo-');
  const env = { ...process.env, VTPM_XEN_DIR: dir };
  const back = start(['back', '0'], env);
  const guests = [start(['front', '1', '0'], env), start(['front', '2', '0'], env)];
  try {
    await back.next('ready');
    for (const [i, g] of guests.entries()) {
      const ready = await g.next('ready');
      back.proc.send({ kind: 'offer', offer: ready.offer });
      await back.next('connected');
      console.log(`dom${i + 1}: ring page granted to dom0, event channel bound`);
    }
    const t0 = process.hrtime.bigint();
    const runs = guests.map((g) => {
      g.proc.send({ kind: 'run', count: 50_000, inflight: 32 });
      return g.next('ran');
    });
    const results = await Promise.all(runs);
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    results.forEach((r, i) => console.log(`dom${i + 1}: ${String(r.count)} requests answered, ${String(r.bad)} wrong`));
    console.log(`both guests: ${((100_000 / ms) * 1000).toFixed(0)} requests/s`);
    const rejected = back.next('rejected');
    guests[0]!.proc.send({ kind: 'garbage-indices' });
    console.log(`dom0 cut off ${String((await rejected).reason)}`);
    guests[1]!.proc.send({ kind: 'run', count: 10_000, inflight: 8 });
    const after = await guests[1]!.next('ran');
    console.log(`dom2 still served: ${String(after.count)} more requests, ${String(after.bad)} wrong`);
  } finally {
    for (const p of [back, ...guests]) p.proc.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

export function register(program: Command): void {
  program
    .command('ring-demo')
    .description('two guests and a backend exchanging requests over granted ring pages; one guest turns hostile')
    .action(ringDemo);
}
