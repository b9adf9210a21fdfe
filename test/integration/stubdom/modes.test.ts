// Same vTPMs in every layout: a host stopped in one mode and started in another (same state dir) serves
// the same vTPM to the same VM. single → stubdom → multi, each writing an NV index the next one reads,
// through tpm2-tools on the guest's TCTI bridge.
import { afterAll, beforeEach, describe, expect, it, onTestFailed } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { freePortPair } from '../../../src/cli/ports.js';
import { dumpLogs, run, status, tcti, vtpm } from '../multivm/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('stubdom-modes');
const runDir = join(work, 'run');
const vm = randomUUID();

beforeEach(() => onTestFailed(() => dumpLogs(runDir)));
afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

/** Bring the host up in `mode`, attach the VM as dom1, run `body` against its TCTI port, bring it down. */
async function inMode(mode: 'single' | 'multi' | 'stubdom', body: (port: number) => Promise<void>): Promise<void> {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', mode, '--isolation', 'none');
  try {
    const port = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vm, '--tcti-port', String(port));
    expect((await status(runDir)).mode).toBe(mode);
    await body(port);
  } finally {
    await vtpm('host', 'down', '--run', runDir);
  }
}

const nvWrite = async (port: number, text: string): Promise<void> => {
  fs.writeFileSync(join(work, 'nv.in'), text.padEnd(16));
  await run('tpm2_nvwrite', ['0x1500030', '-C', 'o', '-i', join(work, 'nv.in')], { env: tcti(port) });
};
const nvRead = async (port: number): Promise<string> => (await run('tpm2_nvread', ['0x1500030', '-C', 'o', '-s', '16'], { env: tcti(port) })).stdout.trimEnd();

describe('state across modes', () => {
  it('serves the same vTPM in single, stubdom and multi mode from one state dir', async () => {
    await inMode('single', async (port) => {
      await run('tpm2_nvdefine', ['0x1500030', '-C', 'o', '-s', '16', '-a', 'ownerread|ownerwrite'], { env: tcti(port) });
      await nvWrite(port, 'from single');
    });
    await inMode('stubdom', async (port) => {
      const d = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain');
      expect(d).toHaveLength(1);
      expect(await nvRead(port)).toBe('from single');
      await nvWrite(port, 'from stubdom');
    });
    await inMode('multi', async (port) => {
      expect(await nvRead(port)).toBe('from stubdom');
      await nvWrite(port, 'from multi');
    });
    await inMode('stubdom', async (port) => {
      expect(await nvRead(port)).toBe('from multi');
    });
  });
});
