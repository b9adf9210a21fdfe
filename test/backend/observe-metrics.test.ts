// What a guest's command costs the metrics: counting it and noting its error touch no prom-client
// series (each inc() and set() hashes its label set); the counts and the last error reach
// vtpm_commands_total and vtpm_guest_last_error_timestamp_seconds when they are read, exactly.
import { describe, expect, it, vi } from 'vitest';
import type * as Prom from 'prom-client';
import { registry } from '../../src/util/metrics.js';
import { GuestObserver } from '../../src/backend/observe.js';

// TPM2_PCR_Extend header (the body does not matter to the metrics); responses: success, TPM_RC_LOCALITY.
const EXTEND = Uint8Array.from(Buffer.from('80020000004100000182', 'hex'));
const OK = Uint8Array.from(Buffer.from('80010000000a00000000', 'hex'));
const LOCALITY = Uint8Array.from(Buffer.from('80010000000a00000907', 'hex'));

function series(text: string, name: string, labels: Record<string, string>): string[] {
  return text.split('\n').filter((l) => l.startsWith(`${name}{`) && Object.entries(labels).every(([k, v]) => l.includes(`${k}="${v}"`)));
}

describe('backend metrics per command', () => {
  it('counts commands and notes errors without a prom-client call per command; a scrape shows them exactly', async () => {
    const obs = new GuestObserver({ domid: '77', vm: 'vm-observe-test', transport: 'ring' });
    const commands = registry.getSingleMetric('vtpm_commands_total') as Prom.Counter;
    const lastError = registry.getSingleMetric('vtpm_guest_last_error_timestamp_seconds') as Prom.Gauge;
    const inc = vi.spyOn(commands, 'inc');
    const set = vi.spyOn(lastError, 'set');
    const remove = vi.spyOn(lastError, 'remove');
    try {
      // Each command took 3 ms and more (a loaded machine adds to it): none falls in a bucket below 3 ms.
      const t0 = performance.now() - 3;
      for (let i = 0; i < 1000; i++) obs.done(EXTEND, i % 4 === 0 ? LOCALITY : OK, t0);
      obs.done(EXTEND, null, t0);
      expect(inc).not.toHaveBeenCalled();
      expect(set).not.toHaveBeenCalled();
      expect(remove).not.toHaveBeenCalled();
    } finally {
      inc.mockRestore();
      set.mockRestore();
      remove.mockRestore();
    }
    const l = { domid: '77', vm: 'vm-observe-test', transport: 'ring', command: 'PCR_Extend' };
    const text = await registry.metrics();
    expect(series(text, 'vtpm_commands_total', { ...l, rc: 'success' })).toEqual([expect.stringMatching(/ 750$/)]);
    expect(series(text, 'vtpm_commands_total', { ...l, rc: 'tpm_error' })).toEqual([expect.stringMatching(/ 250$/)]);
    expect(series(text, 'vtpm_commands_total', { ...l, rc: 'failure' })).toEqual([expect.stringMatching(/ 1$/)]);
    // One last-error series per guest: the failure came last and replaced the tpm_error one.
    const errors = series(await registry.metrics(), 'vtpm_guest_last_error_timestamp_seconds', { domid: '77' });
    expect(errors).toHaveLength(1);
    expect(errors[0]).toContain('error="failure"');
    expect(Number(errors[0]!.slice(errors[0]!.lastIndexOf(' ') + 1))).toBeGreaterThan(Date.now() / 1000 - 60);
    // The durations: cumulative buckets, count and sum, with the guest's labels (le after them).
    const d = { transport: 'ring', domid: '77', vm: 'vm-observe-test' };
    expect(series(text, 'vtpm_command_duration_seconds_bucket', { ...d, le: '0.0025' })).toEqual([expect.stringMatching(/ 0$/)]);
    expect(series(text, 'vtpm_command_duration_seconds_bucket', { ...d, le: '10' })).toEqual([expect.stringMatching(/ 1001$/)]);
    expect(series(text, 'vtpm_command_duration_seconds_bucket', { ...d, le: '+Inf' })).toEqual([expect.stringMatching(/ 1001$/)]);
    expect(series(text, 'vtpm_command_duration_seconds_count', d)).toEqual([expect.stringMatching(/ 1001$/)]);
    const sum = Number(series(text, 'vtpm_command_duration_seconds_sum', d)[0]!.split(' ').pop());
    expect(sum).toBeGreaterThan(1001 * 0.003);
    expect(sum).toBeLessThan(1001 * 10);
    // Counted once: a second scrape adds nothing.
    obs.done(EXTEND, OK, performance.now());
    expect(series(await registry.metrics(), 'vtpm_commands_total', { ...l, rc: 'success' })).toEqual([expect.stringMatching(/ 751$/)]);
  });
});
