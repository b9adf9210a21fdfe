// Two hosts on one machine never share domain uids: a domain's processes are found (and stopped at
// detach) by uid, so a shared range would let one host's `guest detach` kill the other host's guest.
// A host given an explicit --uid-base that overlaps a live host's range is refused; a host left to the
// default takes the next free range.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { freePortPair } from '../../../src/cli/ports.js';
import { UID_RANGE } from '../../../src/cli/isolation.js';
import { claimDir } from '../../../src/cli/uid-claims.js';
import { alive } from '../../../src/cli/rundir.js';
import { ROOT } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { run, status, tcti } from '../multivm/host.js';

const exec = promisify(execFile);
const cli = join(ROOT, 'dist/src/cli/main.js');
// A base of our own (per test process), so the default range other test files' hosts take is not ours.
const BASE = 0x60000000 + ((process.pid & 0x3ff) << 18);
const vtpm = (args: string[], env: Record<string, string> = {}) =>
  exec(process.execPath, [cli, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1', ...env } });

async function uidBaseOf(runDir: string): Promise<number> {
  const s = JSON.parse((await vtpm(['host', 'status', '--run', runDir, '--json'])).stdout) as { isolation: { mode: string; uidBase: number } };
  expect(s.isolation.mode).toBe('uid');
  return s.isolation.uidBase;
}

describe('uid ranges of two hosts on one machine', () => {
  let work = '';
  const runA = (): string => join(work, 'a', 'run');
  const runB = (): string => join(work, 'b', 'run');
  const runC = (): string => join(work, 'c', 'run');

  beforeAll(async () => {
    work = tempDir('iso-ranges', '/var/tmp');
    fs.chmodSync(work, 0o711);
    await vtpm(['host', 'up', '--run', runA(), '--state', join(work, 'a', 'state'), '--uid-base', String(BASE)]);
  });

  afterAll(async () => {
    for (const r of [runA(), runB(), runC()]) await vtpm(['host', 'down', '--run', r]).catch(() => {});
    removeDir(work);
  });

  it('refuses an explicit --uid-base overlapping a live host, naming that host', async () => {
    const err = await vtpm(['host', 'up', '--run', runC(), '--state', join(work, 'c', 'state'), '--uid-base', String(BASE + 100)]).then(
      () => null,
      (e: { stderr: string; code: number }) => e,
    );
    expect(err).not.toBeNull();
    expect(err!.stderr).toContain(`overlap those of the host in ${runA()} (uid base ${BASE})`);
    expect(err!.stderr).toContain('--uid-base');
    expect(fs.existsSync(join(runC(), 'host.json'))).toBe(false);
  });

  it('gives a host left to the default the next free range, and a detach on one host spares the other', async () => {
    await vtpm(['host', 'up', '--run', runB(), '--state', join(work, 'b', 'state')], { VTPM_UID_BASE: String(BASE) });
    expect(await uidBaseOf(runA())).toBe(BASE);
    expect(await uidBaseOf(runB())).toBe(BASE + UID_RANGE);

    // The same domid on both hosts: before ranges were claimed, both ran as uid BASE+5.
    const portA = await freePortPair();
    const portB = await freePortPair();
    await vtpm(['guest', 'attach', '--run', runA(), '--domid', '5', '--vm', randomUUID(), '--tcti-port', String(portA)]);
    await vtpm(['guest', 'attach', '--run', runB(), '--domid', '5', '--vm', randomUUID(), '--tcti-port', String(portB)]);
    const guestB = (await status(runB())).processes.find((p) => p.role === 'guest')!;
    expect(fs.readFileSync(`/proc/${guestB.pid}/status`, 'latin1')).toMatch(new RegExp(`^Uid:\\s+${BASE + UID_RANGE + 5}\\b`, 'm'));

    await vtpm(['guest', 'detach', '--run', runA(), '--domid', '5']);
    expect(alive(guestB.pid)).toBe(true);
    await run('tpm2_startup', ['-c'], { env: tcti(portB) });
    const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], { env: tcti(portB) });
    expect(stdout).toMatch(/^[0-9a-f]{16}$/);
  });

  it('gives the range back at host down', async () => {
    expect(fs.existsSync(join(claimDir(), String(BASE)))).toBe(true);
    await vtpm(['host', 'down', '--run', runA()]);
    expect(fs.existsSync(join(claimDir(), String(BASE)))).toBe(false);
    // The range A held is free again, exactly (B still holds the next one).
    await vtpm(['host', 'up', '--run', runC(), '--state', join(work, 'c', 'state'), '--uid-base', String(BASE)]);
    expect(await uidBaseOf(runC())).toBe(BASE);
  });
});
