// Hostile guests next to well-behaved ones, all real processes: each misbehaving frontend is cut off
// alone (its backend device to Closing, the reason in xenstore's error/ node and the backend log),
// while the good guests keep running tpm2-tools and the backend process never restarts.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { attachGoodGuests, run, until, vtpm, type GoodGuest } from '../../helpers/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';


const work = tempDir('hostile');
const runDir = join(work, 'run');
let good: GoodGuest[] = [];
let backendPid = 0;

const xsRead = async (path: string): Promise<string> =>
  (await run('xenstore-read', [path], { env: { ...process.env, XENSTORED_PATH: join(runDir, 'xenstored.sock') } })).stdout.trim();

async function goodGuestsWork(): Promise<void> {
  await Promise.all(
    good.map(async (g) => {
      const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], { env: { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${g.port}` } });
      expect(stdout).toMatch(/^[0-9a-f]{16}$/);
    }),
  );
}

const backendLog = (): string => fs.readFileSync(join(runDir, 'logs', 'backend.log'), 'utf8');
const guestLog = (domid: number): string => fs.readFileSync(join(runDir, 'logs', `guest-${domid}.log`), 'utf8');

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'));
  const status = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { processes: Array<{ role: string; pid: number }> };
  backendPid = status.processes.find((p) => p.role === 'backend')!.pid;
  good = await attachGoodGuests(runDir);
});

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

async function attachHostile(domid: number, protocol: 'v2' | 'ring', how: string): Promise<void> {
  await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', randomUUID(), '--protocol', protocol, '--misbehave', how);
}

describe('hostile guests', () => {
  it('cuts off a ring frontend that lies about req_prod: Closing, error node, log line', async () => {
    await attachHostile(10, 'ring', 'garbage-indices');
    const error = await until(() => xsRead('/local/domain/0/error/backend/vtpm/10/0/error'), 'the error node');
    expect(error).toMatch(/^71 bogus ring requests: req_prod \d+ is 100000 past rsp_prod_pvt \d+ \(ring size 32\)$/);
    expect(backendLog()).toMatch(/dom10: cut off: bogus ring requests/);
    // The backend went Closing; the guest saw it and closed its device (its process then exits).
    await until(async () => (/dom10: device closed: backend went to Closing/.test(guestLog(10)) ? true : undefined), 'the guest to see Closing');
    await goodGuestsWork();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '10');
  });

  it('cuts off a v2 frontend that submits a length past its page', async () => {
    await attachHostile(11, 'v2', 'oversize');
    expect(await until(() => xsRead('/local/domain/0/error/backend/vtpm/11/0/error'), 'the error node')).toBe('71 v2 request length 5000 exceeds 4088 bytes');
    expect(backendLog()).toMatch(/dom11: cut off: v2 request length 5000 exceeds 4088 bytes/);
    await until(async () => (/dom11: device closed: backend went to Closing/.test(guestLog(11)) ? true : undefined), 'the guest to see Closing');
    await goodGuestsWork();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '11');
  });

  it('refuses a frontend revoking its ring grant while the backend has it mapped; the device keeps working', async () => {
    await attachHostile(12, 'ring', 'revoke');
    const line = await until(async () => /misbehaving \(revoke\): (.*)/.exec(guestLog(12))?.[1], 'the revoke attempt');
    expect(line).toMatch(/^end_access of ring-ref \d+ while mapped: refused; device still answers \(\d+ bytes\)$/);
    await goodGuestsWork();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '12');
  });

  it('keeps serving the good guests while one floods its ring', async () => {
    await attachHostile(13, 'ring', 'flood');
    // During the flood, the good guests' commands still complete.
    await goodGuestsWork();
    const line = await until(async () => /misbehaving \(flood\): (.*)/.exec(guestLog(13))?.[1], 'the flood to end');
    expect(line).toMatch(/^flooded: \d+ commands answered in 2 s$/);
    await goodGuestsWork();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '13');
  });

  it('survives a guest that dies in the middle of a long command; the toolstack still detaches it', async () => {
    await attachHostile(14, 'v2', 'die-mid-command');
    const pid = JSON.parse(fs.readFileSync(join(runDir, 'guests', 'dom14.json'), 'utf8')).pid as number;
    await until(async () => {
      try {
        process.kill(pid, 0);
        return undefined;
      } catch {
        return true;
      }
    }, 'the guest to die');
    await goodGuestsWork();
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '14');
    await goodGuestsWork();
  });

  it('never restarted the backend', async () => {
    const status = JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { processes: Array<{ role: string; pid: number; alive: boolean }> };
    const be = status.processes.find((p) => p.role === 'backend')!;
    expect(be.pid).toBe(backendPid);
    expect(be.alive).toBe(true);
  });
});
