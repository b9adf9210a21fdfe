// The CI run of `vtpm stress`: 8 guests × 2000 commands, a suspend/resume about every 100 commands of
// each guest (160 cycles, every one delivered) and a -9 kill (guest process, backend or manager) every
// 1000 answered commands (hence the generous timeouts; the test asserts no timings). The harness's own
// checks (one answer per command, PCR == SHA-256 model of the acknowledged extends, NV == last
// acknowledged write) must find nothing, and its JSON and HTML reports must say so.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { dist } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const out = tempDir('stress-report');

afterAll(() => removeDir(out));

describe('vtpm stress (CI size)', () => {
  it('8 guests × 2000 commands, each suspended about every 100, kills on: zero violations, every suspend delivered', async () => {
    const json = join(out, 'stress.json');
    const html = join(out, 'stress.html');
    const r = await run(
      process.execPath,
      [dist('src/cli/main.js'), 'stress', '--guests', '8', '--commands', '2000', '--suspend-every', '100', '--kill-every', '1000', '--seed', '7', '--json', json, '--html', html, '--timeout', '400000'],
      { env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: '64' }, maxBuffer: 1 << 24 },
    ).catch((e: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`stress failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
    });
    expect(r.stdout).toMatch(/violations\s+0/);
    const report = JSON.parse(fs.readFileSync(json, 'utf8')) as {
      violations: number;
      answered: number;
      faults: { kind: string }[];
      asked: { suspends: number; kills: number };
      delivered: { suspends: number; kills: number };
      perGuest: { pcrOk: boolean; nvOk: boolean; extends: number }[];
    };
    expect(report.violations).toBe(0);
    expect(report.answered).toBe(8 * 2004);
    const kinds = new Set(report.faults.map((f) => f.kind));
    expect(kinds.has('suspend')).toBe(true);
    expect(report.asked.suspends).toBeGreaterThanOrEqual(8 * 15);
    expect(report.delivered.suspends).toBe(report.asked.suspends);
    expect(report.faults.filter((f) => f.kind.startsWith('kill-')).length).toBeGreaterThanOrEqual(3);
    expect(report.perGuest.every((g) => g.pcrOk && g.nvOk && g.extends > 500)).toBe(true);
    const page = fs.readFileSync(html, 'utf8');
    expect(page).toContain('<svg');
    expect(page).not.toMatch(/<script|https?:\/\/(?!www\.w3\.org)/);
  }, 420_000);
});
