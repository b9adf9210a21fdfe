// `vtpm top`'s arithmetic on two scrapes of the backend's metrics: commands/s as a rate over the
// window, p99 as histogram_quantile over the window's buckets, the guest's latest error.
import { expect, it } from 'vitest';
import { formatTop, quantile, topRows } from '../../src/cli/top.js';

const VM = '6f1b0d52-6c1e-4b8e-9a57-3f0c2f7d9a01';
const g = { domid: '5', vm: VM };

function scrape(at: number, commands: number, buckets: Array<[string, number]>, error?: { error: string; at: number }) {
  const families = new Map<string, Array<{ labels: Record<string, string | number>; value: number; metricName?: string }>>();
  families.set('vtpm_guest_info', [{ labels: { ...g, transport: 'ring', state: 'Connected' }, value: 1 }]);
  families.set('vtpm_commands_total', [
    { labels: { ...g, transport: 'ring', command: 'GetRandom', rc: 'success' }, value: commands - 1 },
    { labels: { ...g, transport: 'ring', command: 'Startup', rc: 'tpm_error' }, value: 1 },
  ]);
  families.set(
    'vtpm_command_duration_seconds',
    buckets.map(([le, n]) => ({ labels: { ...g, transport: 'ring', le }, value: n, metricName: 'vtpm_command_duration_seconds_bucket' })),
  );
  if (error) families.set('vtpm_guest_last_error_timestamp_seconds', [{ labels: { ...g, error: error.error }, value: error.at }]);
  return { at, families };
}

it('quantile interpolates within the bucket that holds the rank, as histogram_quantile does', () => {
  const b = new Map([[0.001, 50], [0.002, 90], [0.004, 100], [Infinity, 100]]);
  expect(quantile(0.5, b)).toBeCloseTo(0.001);
  expect(quantile(0.99, b)).toBeCloseTo(0.002 + (0.002 * 9) / 10);
  expect(quantile(0.99, new Map([[Infinity, 0]]))).toBeNull();
});

it('rows: commands/s over the window, p99 of the window alone, the latest error and its age', () => {
  const before = scrape(10_000, 101, [['0.001', 100], ['0.01', 101], ['+Inf', 101]]);
  // 200 more commands in 2 s, all between 1 and 10 ms: the window's p99 ignores the fast ones before.
  const now = scrape(12_000, 301, [['0.001', 100], ['0.01', 301], ['+Inf', 301]], { error: 'tpm_error', at: 7 });
  const rows = topRows(before, now);
  expect(rows).toHaveLength(1);
  expect(rows[0]).toMatchObject({ domid: '5', vm: VM, transport: 'ring', state: 'Connected', commandsPerSecond: 100, lastError: 'tpm_error 5 s ago' });
  expect(rows[0]!.p99).toBeCloseTo(0.001 + 0.009 * 0.99);
  expect(formatTop(rows)).toEqual([
    'GUEST  VM        TRANSPORT  STATE      CMD/S     P99  LAST ERROR',
    'dom5   6f1b0d52  ring       Connected  100.0  9.9 ms  tpm_error 5 s ago',
  ]);
  expect(formatTop([])).toEqual(['GUEST  VM  TRANSPORT  STATE  CMD/S  P99  LAST ERROR', '(no guests)']);
});
