// `guest attach` checks what it can before anything starts and undoes everything when an attach fails
// (issue 24 item 4); one VM's vTPM serves one guest, refused by the CLI and by the backend for devices
// other toolstacks write (item 8, issue 15 item 6); `guest detach` of an unknown guest fails (item 11).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { freePortPair } from '../../src/cli/ports.js';
import { RunDir } from '../../src/cli/rundir.js';
import { connect } from '../../src/xenstore/client.js';
import { getRandom, ok, vtpm } from './cli.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const work = tempDir('cli-attach');
const runDir = join(work, 'run');
const vmU = randomUUID();
let port1 = 0;

beforeAll(async () => {
  await ok('host', 'up', '--run', runDir, '--state', join(work, 'state'));
  port1 = await freePortPair();
  await ok('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vmU, '--tcti-port', String(port1));
  await getRandom(port1);
});

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir);
  removeDir(work);
});

/** What xenstore, the run directory and the hypervisor directory hold for `domid`. */
async function remains(domid: number): Promise<string[]> {
  const rd = new RunDir(runDir);
  const h = rd.readHost();
  const xs = await connect(h.xenstoredSocket);
  const found: string[] = [];
  try {
    for (const p of [`/local/domain/${domid}`, `/local/domain/0/backend/vtpm/${domid}`, `/local/domain/0/error/backend/vtpm/${domid}`, `/libxl/${domid}`]) {
      if ((await xs.tryRead(p)) !== undefined) found.push(p);
    }
    if (await xs.isDomainIntroduced(domid)) found.push(`introduced dom${domid}`);
  } finally {
    await xs.close();
  }
  if (rd.readGuest(domid)) found.push(rd.guestFile(domid));
  for (const f of fs.readdirSync(h.xenDir)) if (f.startsWith(`dom${domid}.`)) found.push(join(h.xenDir, f));
  return found;
}

describe('one VM, one guest', () => {
  it('guest attach refuses a VM another guest has, naming that guest, before anything starts', async () => {
    const r = await vtpm('guest', 'attach', '--run', runDir, '--domid', '7', '--vm', vmU);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vtpm: VM ${vmU} is already attached to dom1: one VM's vTPM serves one guest; detach dom1 first\n`);
    expect(await remains(7)).toEqual([]);
    expect(await getRandom(port1)).toMatch(/^[0-9a-f]{16}$/);
  });

  it('the backend refuses a second device for the VM (written by a toolstack that does not know dom1); the attach says why and leaves nothing', async () => {
    // The CLI's own record of dom1 hidden: as if another toolstack had attached it.
    const rd = new RunDir(runDir);
    const rec = rd.guestFile(1);
    fs.renameSync(rec, `${rec}.hidden`);
    let r;
    try {
      r = await vtpm('guest', 'attach', '--run', runDir, '--domid', '7', '--vm', vmU);
    } finally {
      fs.renameSync(`${rec}.hidden`, rec);
    }
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^vtpm: the backend refused the device: VM ${vmU} already has a vTPM device \\(/local/domain/0/backend/vtpm/1/0\\)`));
    expect(fs.readFileSync(rd.log('backend'), 'utf8')).toMatch(/dom7: cut off: VM .* already has a vTPM device/);
    expect(await remains(7)).toEqual([]);
    // dom1 keeps its vTPM: the refused device never shared (or destroyed) its instance.
    expect(await getRandom(port1)).toMatch(/^[0-9a-f]{16}$/);
  });
});

describe('a failed attach leaves nothing behind', () => {
  it('a taken --tcti-port+1 fails before the guest or its device exist, naming the port', async () => {
    const port = await freePortPair();
    const squatter = net.createServer();
    await new Promise<void>((res) => squatter.listen(port + 1, '127.0.0.1', res));
    try {
      const r = await vtpm('guest', 'attach', '--run', runDir, '--domid', '8', '--vm', randomUUID(), '--tcti-port', String(port));
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`--tcti-port ${port}: 127\\.0\\.0\\.1:${port + 1} is taken \\(EADDRINUSE\\)`));
      expect(await remains(8)).toEqual([]);
    } finally {
      await new Promise((res) => squatter.close(res));
    }
    // With the port free again the same attach works, and a detach removes it all.
    await ok('guest', 'attach', '--run', runDir, '--domid', '8', '--vm', randomUUID(), '--tcti-port', String(port));
    expect(await getRandom(port)).toMatch(/^[0-9a-f]{16}$/);
    await ok('guest', 'detach', '--run', runDir, '--domid', '8');
    expect(await remains(8)).toEqual([]);
  });

  it('a guest that dies before connecting: the attach says why, its device and domain are removed', async () => {
    // Killed as soon as attach has recorded it, long before its frontend can connect.
    const rd = new RunDir(runDir);
    const attach = vtpm('guest', 'attach', '--run', runDir, '--domid', '9', '--vm', randomUUID());
    while (!fs.existsSync(rd.guestFile(9))) await new Promise((r) => setTimeout(r, 1));
    process.kill(rd.readGuest(9)!.pid, 'SIGKILL');
    const r = await attach;
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^vtpm: guest dom9 exited \(SIGKILL\) before connecting/);
    expect(await remains(9)).toEqual([]);
  });
});

describe('a failure after the device connected', () => {
  it('is undone whole: the vTPM is closed at the manager, the device, domain and memory removed, the VM free again', async () => {
    const port = await freePortPair();
    const vm = randomUUID();
    const rd = new RunDir(runDir);
    const mgrLog = rd.log('manager');
    const from = fs.statSync(mgrLog).size;
    // P+1 taken after attach's own check (its guest record appears right after the check, before the
    // guest even has a domain): the guest's bridge fails to listen only once its device is Connected.
    const attach = vtpm('guest', 'attach', '--run', runDir, '--domid', '10', '--vm', vm, '--tcti-port', String(port));
    while (!fs.existsSync(rd.guestFile(10))) await new Promise((r) => setTimeout(r, 1));
    const squatter = net.createServer();
    await new Promise<void>((res) => squatter.listen(port + 1, '127.0.0.1', res));
    let r;
    try {
      r = await attach;
    } finally {
      await new Promise((res) => squatter.close(res));
    }
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^vtpm: attach of dom10 failed: guest exited:[^]*EADDRINUSE/);
    const backend = fs.readFileSync(rd.log('backend'), 'utf8');
    expect(backend).toMatch(new RegExp(`dom10: connected \\(v2\\), vTPM instance (\\d+) of VM ${vm}`));
    const inst = new RegExp(`dom10: connected \\(v2\\), vTPM instance (\\d+)`).exec(backend)![1];
    expect(fs.readFileSync(mgrLog).subarray(from).toString()).toMatch(new RegExp(`closed instance ${inst}\\b`));
    expect(await remains(10)).toEqual([]);
    // Nothing holds the VM: it attaches again, to another domain.
    await ok('guest', 'attach', '--run', runDir, '--domid', '11', '--vm', vm, '--tcti-port', String(port));
    expect(await getRandom(port)).toMatch(/^[0-9a-f]{16}$/);
    await ok('guest', 'detach', '--run', runDir, '--domid', '11');
  });
});

describe('guest detach', () => {
  it('of a guest that does not exist fails with exit 1 and says so', async () => {
    const r = await vtpm('guest', 'detach', '--run', runDir, '--domid', '99');
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^vtpm: no guest dom99 on this host/);
  });
});
