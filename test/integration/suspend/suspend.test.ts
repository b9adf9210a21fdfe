// Suspend/resume against a real host (xenstored, manager, backend as processes, libtpms vTPMs): this
// test process is the guest domain, so it can lose a response on purpose and resubmit its id.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { dist } from '../../helpers/child.js';
import { removeDir, tempDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const cli = dist('src/cli/main.js');
// A suspended guest's vTPM stays loaded in the backend for 1.5 s here (60 s by default). In process.env
// too: restartDaemon starts a backend with this process's environment.
process.env.VTPM_PARK_MS = '1500';
const env = { ...process.env, VTPM_NO_SETUP: '1', VTPM_SUSPEND_BOUND_MS: '10' };
const vtpm = (...args: string[]) => run(process.execPath, [cli, ...args], { env });

type XsClient = import('../../../src/xenstore/client.js').XsClient;
type GuestSession = import('../../../src/frontend/session.js').GuestSession;
type Domain = import('../../../src/xen/index.js').Domain;

const { Domain: DomainCls } = (await import(dist('src/xen/index.js'))) as typeof import('../../../src/xen/index.js');
const { connect } = (await import(dist('src/xenstore/client.js'))) as typeof import('../../../src/xenstore/client.js');
const xenbus = (await import(dist('src/xenstore/xenbus.js'))) as typeof import('../../../src/xenstore/xenbus.js');
const xenbusFront = (await import(dist('src/xenstore/xenbus-frontend.js'))) as typeof import('../../../src/xenstore/xenbus-frontend.js');
const xenbusTool = (await import(dist('src/xenstore/xenbus-toolstack.js'))) as typeof import('../../../src/xenstore/xenbus-toolstack.js');
const { GuestSession: Session } = (await import(dist('src/frontend/session.js'))) as typeof import('../../../src/frontend/session.js');
const tpm2 = (await import(dist('src/tpm/tpm2-commands.js'))) as typeof import('../../../src/tpm/tpm2-commands.js');
const wire = (await import(dist('src/tpm/wire.js'))) as typeof import('../../../src/tpm/wire.js');
const { RunDir } = (await import(dist('src/cli/rundir.js'))) as typeof import('../../../src/cli/rundir.js');
const { restartDaemon } = (await import(dist('src/cli/restart.js'))) as typeof import('../../../src/cli/restart.js');
const { RingFront } = (await import(dist('src/tpmif/ring-front.js'))) as typeof import('../../../src/tpmif/ring-front.js');
const { XS_FEATURE_RING } = (await import(dist('src/xen/tpmif.js'))) as typeof import('../../../src/xen/tpmif.js');

const runBase = tempDir('suspend');
const stateBase = tempDir('suspend-state');
const runDir = join(runBase, 'run');
const stateDir = join(stateBase, 'state');
let dom0: XsClient;

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
  dom0 = await connect(new RunDir(runDir).readHost().xenstoredSocket);
});

afterAll(async () => {
  await dom0?.close().catch(() => {});
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(runBase);
  removeDir(stateBase);
});

/** A guest domain in this process with its vTPM device written as the toolstack does. */
async function guest(domid: number): Promise<{ dom: Domain; xs: XsClient }> {
  const h = new RunDir(runDir).readHost();
  await dom0.introduce(domid);
  await xenbusTool.writeDeviceDirectories(dom0, { frontDomid: domid, backDomid: 0, devid: 0, uuid: `00000000-0000-4000-8000-${String(domid).padStart(12, '0')}` });
  const dom = await DomainCls.create({ domid, dir: h.xenDir });
  const xs = await connect(join(h.domainSocketDir, `dom${domid}.sock`));
  return { dom, xs };
}

/** Suspend as xl does: control/shutdown = suspend, the guest closes its device; then resume=True. */
async function suspendResume(domid: number, s: GuestSession, g: { dom: Domain; xs: XsClient }): Promise<GuestSession> {
  const key = `/local/domain/${domid}/control/shutdown`;
  await dom0.write(key, 'suspend');
  const left = await s.suspend();
  expect(left).toEqual([]);
  await dom0.write(`/local/domain/0/backend/vtpm/${domid}/0/resume`, 'True');
  await dom0.write(key, '');
  return Session.open({ xs: g.xs, dom: g.dom, firstId: s.nextId, reconnect: true });
}

const sha = (...b: Uint8Array[]): Buffer => createHash('sha256').update(Buffer.concat(b)).digest();
const extend = (model: Buffer, d: Uint8Array): Buffer => sha(model, d);
const ok = (r: Uint8Array, what: string): Uint8Array => {
  expect(wire.responseCode(r), what).toBe(0);
  return r;
};

function startHmacSession(): Uint8Array {
  // TPM2_StartAuthSession: tpmKey NULL, bind NULL, nonceCaller 16 bytes, no salt, HMAC, no symmetric, SHA-256.
  const m = new wire.Marshal().u32(0x40000007).u32(0x40000007).tpm2b(randomBytes(16)).u16(0).u8(0x00).u16(0x0010).u16(0x000b);
  return wire.command(wire.TPM2_ST_NO_SESSIONS, 0x176, m);
}
const handlesFrom = (first: number): Uint8Array => tpm2.getHandles(first, 16);

describe('suspend/resume through xenstore', () => {
  it('a PCR_Extend issued right before suspend and resubmitted after resume extends exactly once', async () => {
    const g = await guest(21);
    let s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const a = randomBytes(32);
    const b = randomBytes(32);
    const c = randomBytes(32);
    ok(await s.submit(tpm2.pcrExtendSha256(16, a)), 'extend A');
    // B goes out and the suspend starts at once: the backend answers B before acknowledging.
    const idB = s.nextId;
    const pendingB = s.submit(tpm2.pcrExtendSha256(16, b));
    s = await suspendResume(21, s, g);
    const first = await pendingB;
    ok(first, 'extend B');
    // The guest lost that answer (say) and resubmits B under its id on the new ring: same answer, no run.
    const again = await s.resubmit({ id: idB, command: tpm2.pcrExtendSha256(16, b), locality: 0 });
    expect(Buffer.from(again).toString('hex')).toBe(Buffer.from(first).toString('hex'));
    // A request that had not started before the suspend runs once.
    ok(await s.submit(tpm2.pcrExtendSha256(16, c)), 'extend C');
    const model = extend(extend(extend(Buffer.alloc(32), a), b), c);
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(model.toString('hex'));
    await s.close();
  });

  it('a loaded object and an HMAC session survive suspend/resume', async () => {
    const g = await guest(22);
    let s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const key = tpm2.parseCreatePrimaryHandle(ok(await s.submit(tpm2.createPrimaryRsa(2048)), 'CreatePrimary'));
    const sess = new DataView(ok(await s.submit(startHmacSession()), 'StartAuthSession').buffer).getUint32(10);
    expect(sess >>> 24).toBe(0x02);
    s = await suspendResume(22, s, g);
    // TPM2_ReadPublic of the key handle: the object is still loaded.
    ok(await s.submit(wire.command(wire.TPM2_ST_NO_SESSIONS, 0x173, new wire.Marshal().u32(key))), 'ReadPublic after resume');
    expect(tpm2.parseHandles(await s.submit(handlesFrom(0x80000000)))).toContain(key);
    expect(tpm2.parseHandles(await s.submit(handlesFrom(0x02000000)))).toContain(sess);
    await s.close();
  });

  it('a command still running at the bound is cancelled through libtpms and answered TPM_RC_CANCELED', async () => {
    const g = await guest(23);
    let s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    // An RSA-3072 key generation takes from tens of ms to seconds; the backend's bound here is 10 ms.
    // A generation that happens to finish inside the bound is answered normally: try again (at most 4).
    let canceled: { id: bigint; ms: number } | null = null;
    for (let attempt = 0; attempt < 4 && !canceled; attempt++) {
      const id = s.nextId;
      const long = s.submit(tpm2.createPrimaryRsa(3072, randomBytes(32)));
      const t0 = Date.now();
      s = await suspendResume(23, s, g);
      const rsp = await long;
      const rc = wire.responseCode(rsp);
      expect([0, wire.TPM_RC_CANCELED]).toContain(rc);
      if (rc === wire.TPM_RC_CANCELED) canceled = { id, ms: Date.now() - t0 };
    }
    expect(canceled).not.toBeNull();
    expect(canceled!.ms).toBeLessThan(20_000);
    // Its id is answered from the table after resume: CANCELED again, no key generation.
    expect(wire.responseCode(await s.resubmit({ id: canceled!.id, command: tpm2.createPrimaryRsa(3072), locality: 0 }))).toBe(wire.TPM_RC_CANCELED);
    ok(await s.submit(tpm2.getRandom(8)), 'GetRandom after resume');
    await s.close();
  });

  it('a backend killed after running requests but before their checkpoint is durable re-runs them exactly once', async () => {
    const g = await guest(25);
    const s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const a = randomBytes(32);
    ok(await s.submit(tpm2.pcrExtendSha256(16, a)), 'extend A');
    const rd = new RunDir(runDir);
    const procs = rd.readHost().processes;
    const mgr = procs.find((p) => p.role === 'manager')!;
    const be = procs.find((p) => p.role === 'backend')!;
    const digests = Array.from({ length: 8 }, () => randomBytes(32));
    let answered = 0;
    // A stopped manager holds the checkpoint: the backend runs the extends in libtpms and waits.
    process.kill(mgr.pid, 'SIGSTOP');
    let pending: Promise<Uint8Array>[] = [];
    try {
      pending = digests.map((d) => s.submit(tpm2.pcrExtendSha256(16, d)).then((r) => (answered++, r)));
      await new Promise((r) => setTimeout(r, 300));
      expect(answered, 'answers released before their checkpoint').toBe(0);
      process.kill(be.pid, 'SIGKILL');
    } finally {
      process.kill(mgr.pid, 'SIGCONT');
    }
    await restartDaemon(runDir, 'backend');
    for (const p of pending) ok(await p, 'extend across the backend restart');
    // Whether the dead backend's checkpoint reached the manager (answers from the table) or not
    // (re-run from the one before), each digest is in the PCR once.
    const model = [a, ...digests].reduce(extend, Buffer.alloc(32));
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(model.toString('hex'));
    await s.close();
  });

  it('a command the backend never answers fails ETIME naming its id and command code, and the session goes on', async () => {
    const g = await guest(30);
    const s = await Session.open({ xs: g.xs, dom: g.dom, commandTimeoutMs: 400 });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const be = new RunDir(runDir).readHost().processes.find((p) => p.role === 'backend')!;
    const id = s.nextId;
    // A stopped backend neither answers nor closes the ring: only the session's bound ends the wait.
    process.kill(be.pid, 'SIGSTOP');
    let err: unknown;
    const t0 = performance.now();
    try {
      err = await s.submit(tpm2.getRandom(8)).then(
        () => 'answered',
        (e: unknown) => e,
      );
    } finally {
      process.kill(be.pid, 'SIGCONT');
    }
    expect(performance.now() - t0).toBeGreaterThanOrEqual(390);
    expect(err).toMatchObject({ name: 'FrontendError', code: 'ETIME' });
    expect((err as Error).message).toBe(`ETIME: request ${id} (command code 0x0000017b) got no answer within 400 ms; cancelled`);
    expect(s.inflight()).toEqual([]);
    // The backend, running again, serves the next command on the same ring.
    expect(tpm2.parseGetRandom(ok(await s.submit(tpm2.getRandom(8)), 'GetRandom after the timeout'))).toHaveLength(8);
    await s.close();
  });

  it('a guest whose new ring is published in the same batch as its Closed (no wait for InitWait, as Linux tpmfront) is served on it, vTPM kept', async () => {
    const g = await guest(28);
    const dev = xenbus.vtpmDevice(28, 0, 0);
    const ringOpts = { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING };
    const f1 = new RingFront(g.dom, 0);
    await xenbusFront.frontendConnect(g.xs, dev, { ringRef: f1.refs[0]!, eventChannel: f1.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts);
    ok(await f1.transmit(tpm2.startup()), 'Startup');
    const a = randomBytes(32);
    ok(await f1.transmit(tpm2.pcrExtendSha256(16, a)), 'extend A');
    // Suspend: Closing, the backend's answer, then the ring goes.
    await dom0.write('/local/domain/28/control/shutdown', 'suspend');
    await xenbus.switchState(g.xs, dev.frontend, xenbus.XenbusState.Closing);
    await xenbus.waitForState(g.xs, dev.backend, (st) => st === xenbus.XenbusState.Closing, { timeoutMs: 10_000 });
    await f1.close();
    await dom0.write('/local/domain/0/backend/vtpm/28/0/resume', 'True');
    await dom0.write('/local/domain/28/control/shutdown', '');
    // Closed, Initialising, the new ring and Initialised leave in one write: when the backend next reads
    // our state it is Initialised, with the old ring still attached on its side.
    const f2 = new RingFront(g.dom, 0, { firstId: f1.nextId });
    await Promise.all([
      xenbus.switchState(g.xs, dev.frontend, xenbus.XenbusState.Closed),
      xenbusFront.frontendReconnect(g.xs, dev, { ringRef: f2.refs[0]!, eventChannel: f2.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts),
    ]);
    expect(await xenbus.readState(dom0, dev.backend)).toBe(xenbus.XenbusState.Connected);
    // Served on the new ring, by the same vTPM: A is still in PCR 16.
    const pcr = tpm2.parsePcrRead(await f2.transmit(tpm2.pcrReadSha256(16)));
    expect(Buffer.from(pcr).toString('hex')).toBe(extend(Buffer.alloc(32), a).toString('hex'));
    await f2.close();
  });

  it("the backend signals the resumed guest's new event channel with its Connected on the way to xenstore", async () => {
    const g = await guest(32);
    const dev = xenbus.vtpmDevice(32, 0, 0);
    const s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    await dom0.write('/local/domain/32/control/shutdown', 'suspend');
    expect(await s.suspend()).toEqual([]);
    await dom0.write('/local/domain/0/backend/vtpm/32/0/resume', 'True');
    await dom0.write('/local/domain/32/control/shutdown', '');
    // The new ring published without waiting for that signal; nothing sent on it yet.
    const f2 = new RingFront(g.dom, 0, { firstId: s.nextId });
    // Connected has left for xenstored when the event comes; it is applied right behind it.
    const notified = f2.notified.then(() => xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.Connected, { timeoutMs: 1000 }));
    await xenbusFront.frontendReconnect(g.xs, dev, { ringRef: f2.refs[0]!, eventChannel: f2.port, extra: { [XS_FEATURE_RING]: '1' } }, { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING });
    const state = await Promise.race([notified, new Promise<'no event'>((r) => setTimeout(() => r('no event'), 5000))]);
    expect(state).toBe(xenbus.XenbusState.Connected);
    ok(await f2.transmit(tpm2.getRandom(8)), 'GetRandom on the new ring');
    await f2.close();
  });

  it('a suspend notice on the ring (op 2) makes the backend answer what came before it and go Closing before the frontend writes Closing', async () => {
    const g = await guest(29);
    const dev = xenbus.vtpmDevice(29, 0, 0);
    const ringOpts = { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING };
    const f = new RingFront(g.dom, 0);
    await xenbusFront.frontendConnect(g.xs, dev, { ringRef: f.refs[0]!, eventChannel: f.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts);
    ok(await f.transmit(tpm2.startup()), 'Startup');
    await dom0.write('/local/domain/29/control/shutdown', 'suspend');
    const a = randomBytes(32);
    const extended = f.transmit(tpm2.pcrExtendSha256(16, a));
    void f.announceSuspend();
    // Our state is still Connected: the backend acts on the notice alone.
    expect(await xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.Closing, { timeoutMs: 10_000 })).toBe(xenbus.XenbusState.Closing);
    expect(await xenbus.readState(dom0, dev.frontend)).toBe(xenbus.XenbusState.Connected);
    ok(await extended, 'extend sent before the notice');
    // The rest of the walk as usual: Closing (the backend does not write Closing twice), Closed, InitWait.
    await xenbusFront.frontendClose(g.xs, dev, { timeoutMs: 10_000 });
    await f.close();
    expect(await xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.InitWait, { timeoutMs: 10_000 })).toBe(xenbus.XenbusState.InitWait);
    // Resumed, the vTPM has A in PCR 16: the extend's state was made durable with the notice.
    await dom0.write('/local/domain/0/backend/vtpm/29/0/resume', 'True');
    await dom0.write('/local/domain/29/control/shutdown', '');
    const s = await Session.open({ xs: g.xs, dom: g.dom, firstId: f.nextId, reconnect: true });
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(extend(Buffer.alloc(32), a).toString('hex'));
    await s.close();
  });

  it("the notice's answer on the ring comes after every earlier answer, with the state durable, and the backend drops the ring before the frontend's Closed", async () => {
    const g = await guest(31);
    const dev = xenbus.vtpmDevice(31, 0, 0);
    const ringOpts = { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING };
    const f = new RingFront(g.dom, 0);
    await xenbusFront.frontendConnect(g.xs, dev, { ringRef: f.refs[0]!, eventChannel: f.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts);
    ok(await f.transmit(tpm2.startup()), 'Startup');
    await dom0.write('/local/domain/31/control/shutdown', 'suspend');
    const a = randomBytes(32);
    const extended = f.transmit(tpm2.pcrExtendSha256(16, a));
    // Answered OK, and by then the extend sent before it is answered too (taken off the ring first).
    expect(await f.announceSuspend()).toBe(true);
    expect(f.outstanding).toBe(0);
    ok(await extended, 'extend sent before the notice');
    // Our state still says Connected: the backend takes the ring down on the notice alone, so every
    // grant of it can be ended (a backend still mapping them until our Closed would leave them held).
    expect(await xenbus.readState(dom0, dev.frontend)).toBe(xenbus.XenbusState.Connected);
    await f.close();
    expect(await f.released).toBe(true);
    await xenbusFront.frontendClose(g.xs, dev, { timeoutMs: 10_000 });
    // Durable at the answer: with the backend and the manager both killed (nothing held in memory
    // survives), the resumed guest still finds A in PCR 16.
    const h = new RunDir(runDir).readHost();
    for (const role of ['manager', 'backend'] as const) process.kill(h.processes.find((p) => p.role === role)!.pid, 'SIGKILL');
    // With both dead nobody removes the backend's FIFO pair at the manager (restart.ts does when it
    // restarts a backend under a dead manager; here the manager comes back first).
    for (const f of ['backend.req.fifo', 'backend.rsp.fifo']) rmSync(join(h.managerRunDir, 'clients', f), { force: true });
    await restartDaemon(runDir, 'manager');
    await restartDaemon(runDir, 'backend');
    await dom0.write('/local/domain/0/backend/vtpm/31/0/resume', 'True');
    await dom0.write('/local/domain/31/control/shutdown', '');
    const s = await Session.open({ xs: g.xs, dom: g.dom, firstId: f.nextId, reconnect: true });
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(extend(Buffer.alloc(32), a).toString('hex'));
    await s.close();
  });

  it('a guest suspended while its backend dies resumes from the checkpoint taken at suspend', async () => {
    const g = await guest(26);
    let s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const a = randomBytes(32);
    ok(await s.submit(tpm2.pcrExtendSha256(16, a)), 'extend A');
    const key = tpm2.parseCreatePrimaryHandle(ok(await s.submit(tpm2.createPrimaryRsa(2048)), 'CreatePrimary'));
    const shutdownKey = '/local/domain/26/control/shutdown';
    await dom0.write(shutdownKey, 'suspend');
    expect(await s.suspend()).toEqual([]);
    // The backend kept the vTPM loaded for the resume; it dies with it. Its successor must find the
    // suspended state at the manager.
    const rd = new RunDir(runDir);
    const be = rd.readHost().processes.find((p) => p.role === 'backend')!;
    process.kill(be.pid, 'SIGKILL');
    await restartDaemon(runDir, 'backend');
    await dom0.write('/local/domain/0/backend/vtpm/26/0/resume', 'True');
    await dom0.write(shutdownKey, '');
    s = await Session.open({ xs: g.xs, dom: g.dom, firstId: s.nextId, reconnect: true });
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(extend(Buffer.alloc(32), a).toString('hex'));
    ok(await s.submit(wire.command(wire.TPM2_ST_NO_SESSIONS, 0x173, new wire.Marshal().u32(key))), 'ReadPublic of the key loaded before suspend');
    await s.close();
  });

  it('a suspended guest whose resume does not come in time has its vTPM released to the manager, and resumes from there', async () => {
    const g = await guest(27);
    let s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    const a = randomBytes(32);
    ok(await s.submit(tpm2.pcrExtendSha256(16, a)), 'extend A');
    const sess = new DataView(ok(await s.submit(startHmacSession()), 'StartAuthSession').buffer).getUint32(10);
    const shutdownKey = '/local/domain/27/control/shutdown';
    await dom0.write(shutdownKey, 'suspend');
    expect(await s.suspend()).toEqual([]);
    const log = new RunDir(runDir).log('backend');
    const deadline = Date.now() + 20_000;
    while (!/dom27: no resume within 1500 ms; vTPM instance [0-9]+ released/.test(readFileSync(log, 'utf8'))) {
      expect(Date.now(), 'parked vTPM released').toBeLessThan(deadline);
      await new Promise((r) => setTimeout(r, 100));
    }
    await dom0.write('/local/domain/0/backend/vtpm/27/0/resume', 'True');
    await dom0.write(shutdownKey, '');
    s = await Session.open({ xs: g.xs, dom: g.dom, firstId: s.nextId, reconnect: true });
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(extend(Buffer.alloc(32), a).toString('hex'));
    expect(tpm2.parseHandles(await s.submit(handlesFrom(0x02000000)))).toContain(sess);
    await s.close();
  });

  it('a suspend stays one when the toolstack clears control/shutdown before the backend sees the Closed: the vTPM is parked', async () => {
    const g = await guest(33);
    const dev = xenbus.vtpmDevice(33, 0, 0);
    const f = new RingFront(g.dom, 0);
    await xenbusFront.frontendConnect(g.xs, dev, { ringRef: f.refs[0]!, eventChannel: f.port, extra: { [XS_FEATURE_RING]: '1' } }, { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING });
    ok(await f.transmit(tpm2.startup()), 'Startup');
    const shutdownKey = '/local/domain/33/control/shutdown';
    await dom0.write(shutdownKey, 'suspend');
    expect(await f.announceSuspend()).toBe(true);
    // The toolstack is done with the request (as xl once the guest suspended) before the Closed comes.
    await dom0.write(shutdownKey, '');
    await xenbus.switchState(g.xs, dev.frontend, xenbus.XenbusState.Closed);
    await f.close();
    // Parked, hence released after VTPM_PARK_MS; a close that is no suspend leaves it loaded until detach.
    const log = new RunDir(runDir).log('backend');
    const deadline = Date.now() + 20_000;
    while (!/dom33: no resume within 1500 ms; vTPM instance [0-9]+ released/.test(readFileSync(log, 'utf8'))) {
      expect(Date.now(), 'parked vTPM released').toBeLessThan(deadline);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(readFileSync(log, 'utf8')).toMatch(/dom33: suspended, vTPM instance [0-9]+ saved \(kept loaded for the resume\)/);
  });

  it('a backend killed with -9 mid-stream is restarted; in-flight extends run exactly once', async () => {
    const g = await guest(24);
    const s = await Session.open({ xs: g.xs, dom: g.dom });
    ok(await s.submit(tpm2.startup()), 'Startup');
    let model: Buffer = Buffer.alloc(32);
    // Enough extends that many are still queued or in a group checkpoint when the backend dies, which
    // happens once the first few are answered (group commit with the manager's log answers 40 within
    // a few ms, so a fixed delay would not catch any in flight).
    const digests = Array.from({ length: 400 }, () => randomBytes(32));
    let answered = 0;
    const pending = digests.map((d) => s.submit(tpm2.pcrExtendSha256(16, d)).finally(() => answered++));
    for (const d of digests) model = extend(model, d);
    const rd = new RunDir(runDir);
    const be = rd.readHost().processes.find((p) => p.role === 'backend')!;
    while (answered < 5) await new Promise((r) => setImmediate(r));
    process.kill(be.pid, 'SIGKILL');
    expect(answered).toBeLessThan(digests.length);
    await restartDaemon(runDir, 'backend');
    for (const p of pending) ok(await p, 'extend across the backend restart');
    expect(s.reconnects).toBeGreaterThanOrEqual(1);
    expect(Buffer.from(tpm2.parsePcrRead(await s.submit(tpm2.pcrReadSha256(16)))).toString('hex')).toBe(model.toString('hex'));
    await s.close();
  });
});
