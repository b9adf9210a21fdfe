// Guest strings in daemon logs: a guest that publishes a ring-ref carrying a newline, a forged log line
// and terminal escape sequences is cut off with exactly one backend log line that names it and shows
// its bytes escaped; no line of the log is the guest's, and a good guest next to it keeps working.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { run, until, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { XsClient } from '../../../src/xenstore/client.js';
import { readState, XenbusState } from '../../../src/xenstore/xenbus.js';
import { writeDeviceDirectories } from '../../../src/xenstore/xenbus-toolstack.js';
import { tempDir, removeDir } from '../../helpers/temp.js';


const work = tempDir('loginj');
const runDir = join(work, 'run');
let goodPort = 0;
let dom0: XsClient;

const backendLog = (): string => fs.readFileSync(join(runDir, 'logs', 'backend.log'), 'utf8');

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'));
  goodPort = await freePortPair();
  await vtpm('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', randomUUID(), '--tcti-port', String(goodPort));
  await run('tpm2_startup', ['-c'], { env: { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${goodPort}` } });
  dom0 = await XsClient.connect(join(runDir, 'xenstored.sock'));
});

afterAll(async () => {
  await dom0?.close();
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('log injection', () => {
  it('cuts off a frontend whose ring-ref forges a log line, with one escaped line naming it', async () => {
    const domid = 41;
    await dom0.introduce(domid);
    const dev = await writeDeviceDirectories(dom0, { frontDomid: domid, backDomid: 0, devid: 0 });
    const guest = await XsClient.connect(join(runDir, 'xs', `dom${domid}.sock`));
    await until(async () => ((await readState(guest, dev.backend)) === XenbusState.InitWait ? true : undefined), 'InitWait');
    const forged = '2026-12-07T00:00:00.000Z dom1: connected (v2), vTPM instance 0 of VM owned';
    const ringRef = Buffer.from(`7\n${forged}\x1b[2J\r\u202e`, 'utf8');
    await guest.write(`${dev.frontend}/ring-ref`, ringRef);
    await guest.write(`${dev.frontend}/event-channel`, '5');
    await guest.write(`${dev.frontend}/feature-protocol-v2`, '1');
    await guest.write(`${dev.frontend}/state`, String(XenbusState.Initialised));
    const error = await until(() => dom0.tryRead(`/local/domain/0/error/backend/vtpm/${domid}/0/error`), 'the error node');
    expect(error.startsWith('22 ')).toBe(true);
    await until(async () => ((await readState(dom0, dev.backend)) === XenbusState.Closing ? true : undefined), 'Closing');

    const lines = backendLog().split('\n').filter((l) => l.length > 0);
    // every line is the backend's own: a timestamp first, no control or bidi characters anywhere
    for (const l of lines) {
      expect(l).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z /);
      expect(l).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202e]/);
    }
    expect(lines.filter((l) => l.includes(forged) && !l.includes(`dom${domid}: cut off:`))).toEqual([]);
    const cut = lines.filter((l) => l.includes(`dom${domid}:`));
    expect(cut).toHaveLength(1);
    expect(cut[0]).toContain(
      `dom${domid}: cut off: frontend /local/domain/${domid}/device/vtpm/0 published ring-ref "7\\n${forged}\\x1b[2J\\r\\u202e" event-channel "5"`,
    );
    await guest.close();

    const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], { env: { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${goodPort}` } });
    expect(stdout).toMatch(/^[0-9a-f]{16}$/);
  });
});
