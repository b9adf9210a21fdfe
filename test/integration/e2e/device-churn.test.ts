// Devices added and removed by the toolstack leave nothing behind: the backend's last state write for
// a device whose directory is gone must not re-create it (a ghost with only `state` and features),
// which the next scan would pick up as a device, finish, and re-create again: one more each time, for
// ever. Found by `npm run fuzz`, whose guests come back as new devices after each cut-off.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { vtpm } from '../../helpers/host.js';
import { XsClient } from '../../../src/xenstore/client.js';
import { readState, XenbusState } from '../../../src/xenstore/xenbus.js';
import { removeDeviceDirectories, writeDeviceDirectories } from '../../../src/xenstore/xenbus-toolstack.js';
import { tempDir, removeDir } from '../../helpers/temp.js';


const work = tempDir('churn');
const runDir = join(work, 'run');
let dom0: XsClient;

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'));
  dom0 = await XsClient.connect(join(runDir, 'xenstored.sock'));
});

afterAll(async () => {
  await dom0?.close();
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('device churn', () => {
  it('leaves no ghost backend directories after devices are added and removed', async () => {
    const domid = 51;
    await dom0.introduce(domid);
    for (let devid = 0; devid < 6; devid++) {
      const dev = await writeDeviceDirectories(dom0, { frontDomid: domid, backDomid: 0, devid });
      const deadline = Date.now() + 10_000;
      while ((await readState(dom0, dev.backend).catch(() => XenbusState.Unknown)) !== XenbusState.InitWait) {
        if (Date.now() > deadline) throw new Error('no InitWait');
        await sleep(20);
      }
      await removeDeviceDirectories(dom0, dev);
    }
    await sleep(1500);
    const left = await dom0.directory(`/local/domain/0/backend/vtpm/${domid}`).catch(() => []);
    expect(left).toEqual([]);
    const removed = fs.readFileSync(join(runDir, 'logs', 'backend.log'), 'utf8').split('\n').filter((l) => l.includes(`dom${domid}: device`) && l.includes('removed'));
    expect(removed.length).toBeLessThanOrEqual(6);
  });
});
