// The vertical slice with real clients: `vtpm host up` (xenstored, manager, backend as processes),
// 16 guest processes attached over both transports, each running tpm2-tools through its TCTI bridge;
// then `host down` + `host up` and the NV indices and persistent keys are still there.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { run, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { expectGuestScripts } from './guest-script.js';
import { tempDir, removeDir } from '../../helpers/temp.js';


const work = tempDir('e2e');
const runDir = join(work, 'run');
const stateDir = join(work, 'state');
const N = 16;
const guests: Array<{ domid: number; vm: string; port: number; protocol: 'v2' | 'ring' }> = [];

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
});

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('tpm2-tools through guest frontends', () => {
  it('lists the hypervisor, xenstored, manager and backend in host status --json', async () => {
    const s = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { processes: Array<{ role: string; domid: number; pid: number }> };
    expect(s.processes.map((p) => p.role).sort()).toEqual(['backend', 'hypervisor', 'manager', 'xenstored']);
    for (const p of s.processes) expect(p.domid).toBe(0);
  });

  it(`runs the full tpm2-tools script in ${N} guests at once, every result correct`, async () => {
    for (let i = 1; i <= N; i++) {
      const port = await freePortPair();
      const g = { domid: i, vm: randomUUID(), port, protocol: (i % 2 ? 'v2' : 'ring') as 'v2' | 'ring' };
      await vtpm('guest', 'attach', '--run', runDir, '--domid', String(i), '--vm', g.vm, '--protocol', g.protocol, '--tcti-port', String(port));
      guests.push(g);
    }
    const status = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { processes: Array<{ role: string; domid: number }> };
    expect(status.processes.filter((p) => p.role === 'guest').map((p) => p.domid).sort((a, b) => a - b)).toEqual(guests.map((g) => g.domid));
    await expectGuestScripts(work, guests);
  }, 400_000);

  it('keeps NV indices and persistent keys across host down + host up', async () => {
    await vtpm('host', 'down', '--run', runDir);
    await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
    for (const g of guests.slice(0, 4)) {
      await vtpm('guest', 'attach', '--run', runDir, '--domid', String(g.domid), '--vm', g.vm, '--protocol', g.protocol, '--tcti-port', String(g.port));
      const env = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${g.port}` };
      await run('tpm2_startup', ['-c'], { env });
      const nv = await run('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', String(`hello from dom${g.domid}`.length)], { env });
      expect(nv.stdout).toBe(`hello from dom${g.domid}`);
      const pub = await run('tpm2_readpublic', ['-c', '0x81000016'], { env });
      expect(pub.stdout).toMatch(/type:\s*\n?\s*value: ecc/);
    }
  }, 300_000);

  it('gives a new VM a fresh vTPM without the other VMs\' NV indices', async () => {
    const port = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '40', '--vm', randomUUID(), '--tcti-port', String(port));
    const env = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` };
    await run('tpm2_startup', ['-c'], { env });
    await expect(run('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', '4'], { env })).rejects.toThrow();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '40');
  });
});
