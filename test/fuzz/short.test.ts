// The short fuzz run of `npm test`: a few thousand generated hostile inputs from all five raw peers
// (xs_wire, manager client FIFO, QEMU control socket, v2 page, ring slots) against a live host. Every
// input is answered or its sender cut off, no daemon restarts or grows past 64 MiB, and the good
// guests, xenstored, the manager and the QEMU endpoint answer within 2 s after every batch.
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../helpers/child.js';
import type { FuzzSummary } from '../../scripts/fuzz.js';

const run = promisify(execFile);

describe('npm run fuzz (short)', () => {
  it('3000 hostile inputs: offenders cut off alone, no restart, no growth past 64 MiB, everyone else answered', async () => {
    const { stdout } = await run(process.execPath, [join(ROOT, 'dist/scripts/fuzz.js'), '--inputs', '3000', '--rounds', '3', '--seed', '15', '--json'], {
      env: { ...process.env, VTPM_NO_SETUP: '1' },
      maxBuffer: 16 << 20,
    });
    const s = JSON.parse(stdout) as FuzzSummary;
    expect(s.totalInputs).toBeGreaterThanOrEqual(3000);
    expect(Object.keys(s.targets).sort()).toEqual(['manager frames', 'ring slots', 'swtpm ctrl', 'v2 page', 'xs_wire']);
    for (const [name, t] of Object.entries(s.targets)) {
      expect(t.inputs, name).toBeGreaterThan(0);
      expect(t.unanswered, name).toBe(0);
    }
    // the generators include framing violations: each of these peers was cut off (and came back)
    for (const name of ['xs_wire', 'v2 page', 'ring slots', 'manager frames']) expect(s.targets[name]!.cutOffs, name).toBeGreaterThan(0);
    expect(s.restarts).toBe(0);
    expect(s.liveness.failures).toEqual([]);
    expect(s.liveness.checks).toBeGreaterThanOrEqual(16);
    for (const [role, r] of Object.entries(s.rssMiB)) expect(r.max - r.start, role).toBeLessThan(64);
  }, 120_000);
});
