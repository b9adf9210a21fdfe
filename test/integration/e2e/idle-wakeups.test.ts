// An idle host costs (almost) nothing: no daemon wakes its event loop on a short timer while nothing
// happens. Counted in syscalls (strace -c on each daemon for 2 s), not in time, so load cannot make it flaky.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { run, vtpm } from '../../helpers/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('idle');
const runDir = join(work, 'run');

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'));
}, 60_000);
afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => undefined);
  removeDir(work);
});

/** epoll waits a process makes in `seconds` (each wake-up of its event loop is one or two). */
async function epollWaits(pid: number, seconds: number): Promise<number> {
  const r = await run('timeout', ['-s', 'INT', String(seconds), 'strace', '-f', '-c', '-e', 'trace=epoll_wait,epoll_pwait', '-p', String(pid)]).catch((e: { stderr: string }) => e);
  // strace -c's table: % time, seconds, usecs/call, calls, [errors,] syscall.
  const line = r.stderr.split('\n').find((l) => /\sepoll_p?wait\s*$/.test(l));
  if (!line) throw new Error(`no epoll line in strace's summary for pid ${pid}:\n${r.stderr}`);
  return Number(line.trim().split(/\s+/)[3]);
}

describe('an idle host', () => {
  it('wakes each dom0 daemon at most a few times a second (prom-client samples event-loop lag once a second, not every 10 ms)', async () => {
    const host = JSON.parse(fs.readFileSync(join(runDir, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
    const counts: Record<string, number> = {};
    for (const p of host.processes) counts[p.role] = await epollWaits(p.pid, 2);
    expect(Object.keys(counts).sort()).toEqual(['backend', 'hypervisor', 'manager', 'xenstored']);
    // 10 ms timers made ~400 in 2 s per daemon; what is left is the 1 s lag sample and housekeeping.
    for (const [role, n] of Object.entries(counts)) expect(n, `${role}: ${n} epoll waits in 2 s`).toBeLessThan(80);
  }, 60_000);
});
