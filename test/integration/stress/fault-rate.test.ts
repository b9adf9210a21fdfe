// `vtpm stress` delivers the fault rate it is asked for: --suspend-every K gives each guest a
// suspend/resume about every K of its commands (at suspend points drawn per guest, the guest holding
// still until the toolstack suspends it), --kill-every K2 a kill every K2 answered commands of all
// guests; the report says asked vs delivered, and the run still finds no violation.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { dist } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const out = tempDir('stress-rate');

afterAll(() => removeDir(out));

describe('vtpm stress fault rate', () => {
  it('2 guests × 300 commands, --suspend-every 20 --kill-every 100: every asked suspend and kill delivered', async () => {
    const json = join(out, 'rate.json');
    const r = await run(
      process.execPath,
      [dist('src/cli/main.js'), 'stress', '--guests', '2', '--commands', '300', '--suspend-every', '20', '--kill-every', '100', '--seed', '5', '--json', json, '--timeout', '240000'],
      { env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: '64' }, maxBuffer: 1 << 24 },
    ).catch((e: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`stress failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
    });
    const report = JSON.parse(fs.readFileSync(json, 'utf8')) as {
      violations: number;
      answered: number;
      asked: { suspends: number; kills: number };
      delivered: { suspends: number; kills: number };
      faults: { kind: string; target: string }[];
      perGuest: { domid: number; suspendsAsked: number; suspends: number }[];
    };
    expect(report.violations).toBe(0);
    expect(report.answered).toBe(2 * 304);
    // About one per 20 commands of each guest (points are 10..30 apart, none in setup or final reads).
    expect(report.asked.suspends).toBeGreaterThanOrEqual(2 * 13);
    expect(report.asked.suspends).toBeLessThanOrEqual(2 * 30);
    expect(report.delivered.suspends).toBe(report.asked.suspends);
    for (const g of report.perGuest) {
      expect(g.suspendsAsked, `dom${g.domid}`).toBeGreaterThanOrEqual(13);
      expect(g.suspends, `dom${g.domid}`).toBe(g.suspendsAsked);
    }
    // (2 × 304 − 1) / 100 = 6 kill marks; the last lies 8 answers before the end, which two guests
    // can pass between two of the harness's looks.
    expect(report.asked.kills).toBe(6);
    expect(report.delivered.kills).toBeGreaterThanOrEqual(report.asked.kills - 1);
    expect(r.stdout).toMatch(new RegExp(`suspend/resume cycles\\s+${report.asked.suspends} delivered of ${report.asked.suspends} asked`));
  }, 300_000);
});
