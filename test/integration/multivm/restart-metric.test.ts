// Multi-VM mode: a vTPM-domain process killed under its guest is restarted from the manager's state,
// counted in vtpm_domain_restarts_total, and the guest's commands keep being counted; each domain's
// process memory and CPU are exported by the backend (docs/observability.md).
import { afterAll, beforeAll, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { run, tcti, until, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { getFromSocket, metricsSocket } from '../../../src/util/metrics-http.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('mv-restart-metric');
const runDir = join(work, 'run');
const vm = randomUUID();
let port = 0;

const metric = async (re: RegExp): Promise<number | undefined> => {
  const m = re.exec(await getFromSocket(metricsSocket(runDir, 'backend'), '/metrics'));
  return m ? Number(m[1]) : undefined;
};

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', 'multi');
  port = await freePortPair();
  await vtpm('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vm, '--protocol', 'ring', '--tcti-port', String(port));
}, 60_000);
afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

it('counts a vTPM-domain restart, and the guest\'s commands before and after it', async () => {
  await run('tpm2_getrandom', ['8', '--hex'], { env: tcti(port) });
  expect(await metric(/^vtpm_domain_restarts_total\{daemon="backend"\} (\d+)$/m)).toBe(0);
  // The domain's own process, seen from the backend: its resident memory and CPU time.
  expect(await metric(new RegExp(`^vtpm_domain_resident_memory_bytes\\{domid="\\d+",vm="${vm}",daemon="backend"\\} (\\d+)$`, 'm'))).toBeGreaterThan(1 << 20);
  expect(await metric(new RegExp(`^vtpm_domain_cpu_seconds_total\\{domid="\\d+",vm="${vm}",daemon="backend"\\} ([0-9.e-]+)$`, 'm'))).toBeGreaterThan(0);
  const status = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { processes: Array<{ role: string; pid: number }> };
  const domain = status.processes.find((p) => p.role === 'vtpm-domain')!;
  process.kill(domain.pid, 'SIGKILL');
  await until(async () => ((await metric(/^vtpm_domain_restarts_total\{daemon="backend"\} (\d+)$/m)) === 1 ? true : undefined), 'the restart to be counted', 30_000);
  const getRandom = new RegExp(`^vtpm_commands_total\\{domid="1",vm="${vm}",transport="ring",command="GetRandom",rc="success",daemon="backend"\\} (\\d+)$`, 'm');
  const before = (await metric(getRandom)) ?? 0;
  await until(async () => ((await run('tpm2_getrandom', ['8', '--hex'], { env: tcti(port) })).stdout.trim().length === 16 ? true : undefined), 'a command after the restart');
  expect(await metric(getRandom)).toBe(before + 1);
  // The backend's exposition with the domains' series passes promtool.
  const text = await getFromSocket(metricsSocket(runDir, 'backend'), '/metrics');
  const lint = await new Promise<string>((resolve) => {
    const c = execFile('promtool', ['check', 'metrics'], (err, so, se) => resolve(`${err ? 'failed: ' : ''}${so}${se}`));
    c.stdin!.end(text);
  });
  expect(lint).toBe('');
});
