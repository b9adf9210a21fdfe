// A guest's vTPM moves between two hosts (`vtpm host up` twice: two xenstoreds, managers, backends):
// an NV index and a persistent key written with tpm2-tools on host A are read back on host B after
// `vtpm migrate key|out|in`, and host A's manager refuses the VM from then on.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { migrateVm, run, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { ManagerClient } from '../../../src/manager/client.js';
import { Status } from '../../../src/manager/wire.js';
import { tempDir, removeDir } from '../../helpers/temp.js';


const work = tempDir('e2e-mig');
const hosts = { a: { run: join(work, 'a-run'), state: join(work, 'a-state') }, b: { run: join(work, 'b-run'), state: join(work, 'b-state') } };

beforeAll(async () => {
  await vtpm('host', 'up', '--run', hosts.a.run, '--state', hosts.a.state);
  await vtpm('host', 'up', '--run', hosts.b.run, '--state', hosts.b.state);
});

afterAll(async () => {
  for (const h of Object.values(hosts)) await vtpm('host', 'down', '--run', h.run).catch(() => {});
  removeDir(work);
});

describe('vTPM migration between two hosts', () => {
  it('an NV index and a persistent key written on host A are there on host B; A refuses the VM', async () => {
    const vm = randomUUID();
    const secret = randomBytes(24).toString('hex'); // 48 bytes
    const portA = await freePortPair();
    await vtpm('guest', 'attach', '--run', hosts.a.run, '--domid', '5', '--vm', vm, '--tcti-port', String(portA));
    const envA = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${portA}` };
    const wa = join(work, 'guest-a');
    fs.mkdirSync(wa);
    await run(
      'bash',
      [
        '-c',
        `set -euo pipefail
         tpm2_startup -c
         tpm2_nvdefine -Q 0x1500033 -C o -s 48 -a 'ownerread|ownerwrite'
         printf '%s' "$1" | tpm2_nvwrite -Q 0x1500033 -C o -i -
         tpm2_createprimary -Q -C o -g sha256 -G ecc -c primary.ctx
         tpm2_evictcontrol -Q -C o -c primary.ctx 0x81000033
         tpm2_flushcontext -t`,
        'guest-a',
        secret,
      ],
      { env: envA, cwd: wa },
    );
    const pubA = (await run('tpm2_readpublic', ['-c', '0x81000033'], { env: envA })).stdout;
    // The guest goes away on A (its backend saves and CLOSEs the vTPM at A's manager).
    await vtpm('guest', 'detach', '--run', hosts.a.run, '--domid', '5');

    expect(await migrateVm(hosts.a.run, hosts.b.run, vm, work)).toMatch(new RegExp(`vm ${vm}: instance \\d+`));

    const portB = await freePortPair();
    await vtpm('guest', 'attach', '--run', hosts.b.run, '--domid', '9', '--vm', vm, '--tcti-port', String(portB));
    const envB = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${portB}` };
    await run('tpm2_startup', ['-c'], { env: envB });
    expect((await run('tpm2_nvread', ['0x1500033', '-C', 'o', '-s', '48'], { env: envB })).stdout).toBe(secret);
    expect((await run('tpm2_readpublic', ['-c', '0x81000033'], { env: envB })).stdout).toBe(pubA);
    await vtpm('guest', 'detach', '--run', hosts.b.run, '--domid', '9');

    // Host A's manager: the VM is migrated; OPEN (what a backend does for a guest) is refused.
    const ca = await ManagerClient.connect(join(hosts.a.run, 'manager'));
    try {
      await expect(ca.open({ vmUuid: vm, version: '2.0' })).rejects.toMatchObject({ status: Status.BAD_PARAMETER });
    } finally {
      ca.disconnect();
    }
    expect(fs.readFileSync(join(hosts.a.run, 'logs', 'manager.log'), 'utf8')).toMatch(new RegExp(`migrated out instance \\d+ \\(vm ${vm}, permanent`));
  }, 300_000);
});
