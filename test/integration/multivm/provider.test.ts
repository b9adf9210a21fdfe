// MultiVmVtpms on its own: this process is dom0 (the rings' frontend), the manager is the real daemon,
// each vTPM runs in a real vTPM-domain process. Covers what the CLI tests cannot reach quickly: a
// domain that stops answering (killed by the watchdog, never a hang), grants left pinned by a dead
// domain (released, none leaked), restart give-up, and release.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Domain, domainExists } from '../../../src/xen/index.js';
import { ManagerClient } from '../../../src/manager/client.js';
import { MultiVmVtpms, MultiVmError } from '../../../src/backend/multi-vm.js';
import { FIRST_VTPM_DOMID } from '../../../src/backend/domain-pool.js';
import { domainNodeFlags } from '../../../src/backend/domain-flags.js';
import { alive } from '../../../src/cli/rundir.js';
import { freshXenDir } from '../../helpers/child.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import * as tpm12 from '../../../src/tpm/tpm12-commands.js';
import { startManager, type RunningManager } from '../../manager/helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const rc = (r: Uint8Array): number => new DataView(r.buffer, r.byteOffset).getUint32(6);
const WATCHDOG_MS = 1500;

let mgrd: RunningManager;
let mgr: ManagerClient;
let dom0: Domain;
let vtpms: MultiVmVtpms;
const xenDir = freshXenDir();
const work = tempDir('multivm-provider');
const registerDir = join(work, 'vtpm-domains');

/** Grant entries of dom0 in use (flags non-zero): a leak shows up here. */
function grantsInUse(): number {
  const g = dom0.views.grant16;
  let n = 0;
  for (let ref = 8; ref < dom0.views.nrGrantEntries; ref++) if (g[4 * ref] !== 0) n++;
  return n;
}

beforeAll(async () => {
  mgrd = await startManager(join(work, 'state'), join(work, 'mgr'));
  await mgrd.waitLog(/vtpm-manager: ready/);
  mgr = await ManagerClient.connect(join(work, 'mgr'), { name: 'test-backend' });
  dom0 = await Domain.create({ domid: 0, dir: xenDir, geometry: { grantFrames: 4, nrPages: 1024 } });
  vtpms = new MultiVmVtpms({
    dom: dom0,
    mgr,
    managerRunDir: join(work, 'mgr'),
    xenDir,
    registerDir,
    log: () => {},
    commandTimeoutMs: WATCHDOG_MS,
    maxRestarts: 2,
  });
});

afterAll(async () => {
  await vtpms?.stopAll();
  mgr?.disconnect();
  await dom0?.destroy();
  await mgrd?.stop();
  removeDir(work);
  removeDir(xenDir);
});

describe('MultiVmVtpms', () => {
  it('runs each vTPM in its own registered domain process, reached over the ring', async () => {
    const vm = randomUUID();
    const t = await vtpms.open(vm, '2.0', { resume: false });
    expect(rc(await t.execute(tpm2.startup(), { locality: 0 }))).toBe(0);
    const r = await t.execute(tpm2.getRandom(16), { locality: 0 });
    expect(rc(r)).toBe(0);
    expect(r.length).toBe(12 + 16);
    const [d] = vtpms.domains().filter((x) => x.vm === vm);
    expect(d!.domid).toBeGreaterThanOrEqual(FIRST_VTPM_DOMID);
    expect(d!.pid).not.toBe(process.pid);
    expect(alive(d!.pid)).toBe(true);
    const reg = JSON.parse(fs.readFileSync(join(registerDir, `dom${d!.domid}.json`), 'utf8'));
    expect(reg).toEqual({ role: 'vtpm-domain', domid: d!.domid, pid: d!.pid, instance: t.instance, vm, version: '2.0' });
    // A lean domain (docs/multi-vm.md): node runs it with the domain flags before the entry script.
    const argv = fs.readFileSync(`/proc/${d!.pid}/cmdline`, 'utf8').split('\0');
    const script = argv.findIndex((a) => a.endsWith('vtpm-domain-main.js'));
    expect(script).toBeGreaterThan(0);
    expect(argv.slice(1, script)).toEqual(domainNodeFlags());
    // A domain of its own next to dom0, gone with it.
    expect(await domainExists(xenDir, d!.domid)).toBe(true);
    await vtpms.release(t.instance);
    expect(fs.existsSync(join(registerDir, `dom${d!.domid}.json`))).toBe(false);
    for (let i = 0; i < 100 && alive(d!.pid); i++) await sleep(20);
    expect(alive(d!.pid)).toBe(false);
    for (let i = 0; i < 100 && (await domainExists(xenDir, d!.domid)); i++) await sleep(20);
    expect(await domainExists(xenDir, d!.domid)).toBe(false);
  });

  it('kills a domain that stops answering, fails that command, restarts it, and leaks no grants', async () => {
    const vm = randomUUID();
    const t = await vtpms.open(vm, '2.0', { resume: false });
    expect(rc(await t.execute(tpm2.startup(), { locality: 0 }))).toBe(0);
    const inUse = grantsInUse();
    const old = vtpms.domains().find((x) => x.vm === vm)!;
    process.kill(old.pid, 'SIGSTOP');
    const t0 = performance.now();
    await expect(t.execute(tpm2.getRandom(8), { locality: 0 })).rejects.toThrow(/closed/);
    const ms = performance.now() - t0;
    expect(ms).toBeGreaterThanOrEqual(WATCHDOG_MS - 50);
    expect(ms).toBeLessThan(WATCHDOG_MS + 3000);
    // The next command waits for the new incarnation, which was started (Startup(CLEAR)) for the guest.
    const r = await t.execute(tpm2.getRandom(8), { locality: 0 });
    expect(rc(r)).toBe(0);
    const now = vtpms.domains().find((x) => x.vm === vm)!;
    expect(now.pid).not.toBe(old.pid);
    expect(now.domid).not.toBe(old.domid);
    expect(alive(old.pid)).toBe(false);
    expect(fs.existsSync(join(registerDir, `dom${old.domid}.json`))).toBe(false);
    // The dead domain's pinned ring grants were released and revoked; the new ring took as many.
    expect(grantsInUse()).toBe(inUse);
    await vtpms.release(t.instance);
  });

  it('sends a guest request caught in a crash again, same id, to the restarted domain: run once, PCRs kept', async () => {
    const t = await vtpms.open(randomUUID(), '2.0', { resume: false });
    expect(rc(await t.execute(tpm2.startup(), { locality: 0 }))).toBe(0);
    const digest = Buffer.alloc(32, 0x09);
    const extend = tpm2.pcrExtendSha256(16, digest);
    expect(rc(await t.execute(extend, { locality: 0, id: 1n }))).toBe(0);
    const d = vtpms.domains().find((x) => x.instance === t.instance)!;
    // Frozen, the domain holds the next request unrun; killed, it leaves it to the next incarnation.
    process.kill(d.pid, 'SIGSTOP');
    const inFlight = t.execute(extend, { locality: 0, id: 2n });
    await sleep(100);
    process.kill(d.pid, 'SIGKILL');
    expect(rc(await inFlight)).toBe(0);
    expect(vtpms.domains().find((x) => x.instance === t.instance)!.pid).not.toBe(d.pid);
    // Two extends of PCR 16 (reset value zeros), each exactly once, survive the kill.
    const sha = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
    const want = sha(Buffer.concat([sha(Buffer.concat([Buffer.alloc(32), digest])), digest]));
    const pcr = tpm2.parsePcrRead(await t.execute(tpm2.pcrReadSha256(16), { locality: 0, id: 3n }));
    expect(Buffer.from(pcr).toString('hex')).toBe(want.toString('hex'));
    await vtpms.release(t.instance);
  });

  it('refuses a QEMU endpoint with a typed error: its vTPMs live in other processes', async () => {
    await expect(vtpms.open(randomUUID(), '2.0', { qemu: true })).rejects.toMatchObject({ name: 'ProviderError', code: 'NO_QEMU' });
  });

  it('gives a vTPM up after too many crashes, without touching another', async () => {
    const a = await vtpms.open(randomUUID(), '2.0', { resume: false });
    const b = await vtpms.open(randomUUID(), '2.0', { resume: false });
    for (const t of [a, b]) expect(rc(await t.execute(tpm2.startup(), { locality: 0 }))).toBe(0);
    const bPid = vtpms.domains().find((x) => x.instance === b.instance)!.pid;
    for (let k = 0; k < 3; k++) {
      const d = vtpms.domains().find((x) => x.instance === a.instance)!;
      process.kill(d.pid, 'SIGKILL');
      // Once the backend has seen the death, a command goes to the next incarnation (or is refused).
      while (vtpms.domains().some((x) => x.pid === d.pid)) await sleep(5);
      // A command now either fails (given up) or succeeds on the restarted domain.
      const res = await a.execute(tpm2.getRandom(8), { locality: 0 }).then(rc, (e: Error) => e);
      if (k < 2) expect(res).toBe(0);
      else {
        expect(res).toBeInstanceOf(MultiVmError);
        expect((res as MultiVmError).code).toBe('GIVEN_UP');
      }
    }
    expect(vtpms.domains().find((x) => x.instance === b.instance)!.pid).toBe(bPid);
    expect(rc(await b.execute(tpm2.getRandom(8), { locality: 0 }))).toBe(0);
    await vtpms.release(a.instance);
    await vtpms.release(b.instance);
    expect(vtpms.domains()).toEqual([]);
  });
  it('serves a TPM 1.2 vTPM the same way, restarted and started after a kill', async () => {
    const t = await vtpms.open(randomUUID(), '1.2', { resume: false });
    expect(rc(await t.execute(tpm12.startup(), { locality: 0 }))).toBe(0);
    const r = await t.execute(tpm12.getRandom(8), { locality: 0 });
    expect(Buffer.from(r.subarray(0, 2)).toString('hex')).toBe('00c4'); // TPM_TAG_RSP_COMMAND
    expect(rc(r)).toBe(0);
    const d = vtpms.domains().find((x) => x.instance === t.instance)!;
    process.kill(d.pid, 'SIGKILL');
    while (vtpms.domains().some((x) => x.pid === d.pid)) await sleep(5);
    expect(rc(await t.execute(tpm12.getRandom(8), { locality: 0 }))).toBe(0);
    // TPM_Startup was sent for it: a second one is TPM_INVALID_POSTINIT (0x26).
    expect(rc(await t.execute(tpm12.startup(), { locality: 0 }))).toBe(0x26);
    await vtpms.release(t.instance);
  });
});
