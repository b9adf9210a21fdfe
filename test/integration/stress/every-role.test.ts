// `vtpm stress` with kills of every role: guests, the backend and the manager, one at a time at random
// points, often (every 30 answered commands of 4 guests), with suspends between. Ring answers are
// released once two processes hold their checkpoint (docs/suspend-and-stress.md "What survives
// what"), so each single kill must still lose nothing acknowledged: exactly once, PCRs equal to the
// model of acknowledged extends, NV equal to the last acknowledged write.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { dist } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const out = tempDir('stress-roles');

afterAll(() => removeDir(out));

describe('vtpm stress killing every role', () => {
  it('4 guests × 500 commands, --kill-every 30: guests, backend and manager each killed, zero violations', async () => {
    const json = join(out, 'roles.json');
    await run(
      process.execPath,
      [dist('src/cli/main.js'), 'stress', '--guests', '4', '--commands', '500', '--suspend-every', '60', '--kill-every', '30', '--seed', '11', '--json', json, '--timeout', '400000'],
      { env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: '64' }, maxBuffer: 1 << 24 },
    ).catch((e: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`stress failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
    });
    const report = JSON.parse(fs.readFileSync(json, 'utf8')) as {
      violations: number;
      violationDetails: string[];
      faults: { kind: string }[];
      perGuest: { domid: number; pcrOk: boolean; nvOk: boolean }[];
    };
    expect(report.violationDetails).toEqual([]);
    expect(report.violations).toBe(0);
    const kills = (kind: string): number => report.faults.filter((f) => f.kind === kind).length;
    expect(kills('kill-guest')).toBeGreaterThanOrEqual(3);
    expect(kills('kill-backend')).toBeGreaterThanOrEqual(3);
    expect(kills('kill-manager')).toBeGreaterThanOrEqual(3);
    for (const g of report.perGuest) expect(g, `dom${g.domid}`).toMatchObject({ pcrOk: true, nvOk: true });
  }, 450_000);
});
