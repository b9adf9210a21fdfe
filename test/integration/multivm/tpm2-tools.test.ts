// The vertical slice's real-client suite in multi-VM mode: `host up --mode multi`, 6 guests over both
// transports running the full tpm2-tools script, each vTPM in its own vTPM-domain process listed by
// `host status --json`; then the same vTPMs served by a single-mode host and back by a multi-mode one,
// with the NV contents and persistent keys each wrote.
import { afterAll, beforeAll, beforeEach, describe, expect, it, onTestFailed } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { freePortPair } from '../../../src/cli/ports.js';
import { alive } from '../../../src/cli/rundir.js';
import { dumpLogs, run, status, tcti, vtpm } from './host.js';
import { expectGuestScripts } from '../e2e/guest-script.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('multivm-e2e');
const runDir = join(work, 'run');
const stateDir = join(work, 'state');
const N = 6;
const FIRST_VTPM_DOMID = 0x7000;
const guests: Array<{ domid: number; vm: string; port: number; protocol: 'v2' | 'ring' }> = [];

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', stateDir, '--mode', 'multi');
});

// A failure under load is only diagnosable from the host's logs, which afterAll deletes.
beforeEach(() => onTestFailed(() => dumpLogs(runDir)));

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

async function attach(g: (typeof guests)[number]): Promise<void> {
  await vtpm('guest', 'attach', '--run', runDir, '--domid', String(g.domid), '--vm', g.vm, '--protocol', g.protocol, '--tcti-port', String(g.port));
}

async function restart(mode: 'single' | 'multi'): Promise<void> {
  await vtpm('host', 'down', '--run', runDir);
  await vtpm('host', 'up', '--run', runDir, '--state', stateDir, '--mode', mode);
  expect((await status(runDir)).mode).toBe(mode);
}

describe('tpm2-tools in multi-VM mode', () => {
  it(`runs the full tpm2-tools script in ${N} guests, each vTPM in its own vTPM domain`, async () => {
    for (let i = 1; i <= N; i++) {
      const g = { domid: i, vm: randomUUID(), port: await freePortPair(), protocol: (i % 2 ? 'v2' : 'ring') as 'v2' | 'ring' };
      await attach(g);
      guests.push(g);
    }
    const s = await status(runDir);
    expect(s.mode).toBe('multi');
    const doms = s.processes.filter((p) => p.role === 'vtpm-domain');
    // One domain per guest, each its own live process and domid, bound to that guest's VM.
    expect(doms.map((d) => d.vm).sort()).toEqual(guests.map((g) => g.vm).sort());
    expect(new Set(doms.map((d) => d.domid)).size).toBe(N);
    expect(new Set(doms.map((d) => d.pid)).size).toBe(N);
    const backend = s.processes.find((p) => p.role === 'backend')!;
    for (const d of doms) {
      expect(d.domid).toBeGreaterThanOrEqual(FIRST_VTPM_DOMID);
      expect(d.alive).toBe(true);
      expect(d.pid).not.toBe(backend.pid);
      expect(typeof d.instance).toBe('number');
    }
    await expectGuestScripts(work, guests);
  });

  it('stops every vTPM domain on guest detach and on host down', async () => {
    const extra = { domid: 50, vm: randomUUID(), port: await freePortPair(), protocol: 'ring' as const };
    await attach(extra);
    const dom = (await status(runDir)).processes.find((p) => p.role === 'vtpm-domain' && p.vm === extra.vm)!;
    expect(dom.alive).toBe(true);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '50');
    const after = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain');
    expect(after.map((p) => p.vm)).not.toContain(extra.vm);
    expect(alive(dom.pid)).toBe(false);
    expect(after).toHaveLength(N);
    // The backend finished the device once (it used to pick a detaching device up again, in a loop).
    const log = fs.readFileSync(join(runDir, 'logs/backend.log'), 'utf8').split('\n');
    expect(log.filter((l) => l.includes('dom50: device 0 removed'))).toHaveLength(1);

    const pids = after.map((p) => p.pid);
    await restart('single');
    for (const pid of pids) expect(alive(pid)).toBe(false);
    expect((await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain')).toEqual([]);
  });

  it('serves the same vTPMs in single mode: NV written in multi mode, persistent keys', async () => {
    for (const g of guests.slice(0, 3)) {
      await attach(g);
      const env = tcti(g.port);
      await run('tpm2_startup', ['-c'], { env });
      expect((await run('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', String(`hello from dom${g.domid}`.length)], { env })).stdout).toBe(`hello from dom${g.domid}`);
      expect((await run('tpm2_readpublic', ['-c', '0x81000016'], { env })).stdout).toMatch(/type:\s*\n?\s*value: ecc/);
      // Written by the single-mode host, to be read back in multi mode.
      const f = join(work, `single-dom${g.domid}`);
      fs.writeFileSync(f, `single wrote dom${g.domid}`.padEnd(32, '.'));
      await run('tpm2_nvwrite', ['0x1500016', '-C', 'o', '-i', f], { env });
    }
  });

  it('and back in multi mode: what the single-mode host wrote is there', async () => {
    await restart('multi');
    for (const g of guests.slice(0, 3)) {
      await attach(g);
      const env = tcti(g.port);
      await run('tpm2_startup', ['-c'], { env });
      expect((await run('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', '32'], { env })).stdout).toBe(`single wrote dom${g.domid}`.padEnd(32, '.'));
      expect((await run('tpm2_readpublic', ['-c', '0x81000016'], { env })).stdout).toMatch(/type:\s*\n?\s*value: ecc/);
    }
    // An untouched guest of the first run: still its multi-mode contents.
    const g = guests[4]!;
    await attach(g);
    await run('tpm2_startup', ['-c'], { env: tcti(g.port) });
    expect((await run('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', String(`hello from dom${g.domid}`.length)], { env: tcti(g.port) })).stdout).toBe(`hello from dom${g.domid}`);
    expect((await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain')).toHaveLength(4);
  });
});
