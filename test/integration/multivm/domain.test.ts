// A vTPM domain on its own (src/backend/vtpm-domain.ts + vtpm-domain-main.ts): one instance alone in a
// child process with its own domid, its lifecycle on stdio frames, its TPM commands on the ring this
// process (dom0) grants it, its state at the real manager. Started, health-checked, driven, stopped; a
// kill -9 is seen as a crash at once; a request id it answered is answered again, never run twice.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createDomainConnection, Domain } from '../../../src/xen/index.js';
import { RingFront } from '../../../src/tpmif/ring-front.js';
import { DomainError, VTPM_DOMAIN_MAIN, VtpmDomain, type DomainExit } from '../../../src/backend/vtpm-domain.js';
import { DomainMsg, FrameReader, encodeFrame } from '../../../src/tpm/domain-protocol.js';
import { ManagerClient } from '../../../src/manager/client.js';
import { engineEnv } from '../../../src/tpm/threadpool.js';
import { DOMAIN_THREADPOOL_SIZE } from '../../../src/backend/domain-flags.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import { hex, unhex } from '../../tpm/helpers.js';
import { freshXenDir } from '../../helpers/child.js';
import { startManager, type RunningManager } from '../../manager/helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const xenDir = freshXenDir();
const work = tempDir('vtpm-domain');
const mgrDir = join(work, 'mgr');
let mgrd: RunningManager;
let mgr: ManagerClient;
let dom0: Domain;
let nextDomid = 0x7100;

beforeAll(async () => {
  mgrd = await startManager(join(work, 'state'), mgrDir);
  await mgrd.waitLog(/vtpm-manager: ready/);
  mgr = await ManagerClient.connect(mgrDir, { name: 'test-backend' });
  dom0 = await Domain.create({ domid: 0, dir: xenDir, geometry: { grantFrames: 4, nrPages: 1024 } });
});

afterAll(async () => {
  mgr?.disconnect();
  await dom0?.destroy();
  await mgrd?.stop();
  removeDir(work);
  removeDir(xenDir);
});

const started: VtpmDomain[] = [];
afterEach(async () => {
  for (const d of started.splice(0)) {
    if (d.alive) await d.stop();
    else await d.exited();
    await d.front!.close();
  }
});

async function startDomain(instance: number, version: '2.0' | '1.2'): Promise<VtpmDomain> {
  const domid = nextDomid++;
  const front = new RingFront(dom0, domid, { segments: 1 });
  const hvFd = await createDomainConnection({ domid, dir: xenDir });
  const d = await VtpmDomain.start({ instance, domid, version, vm: 'test', front, frontDomid: 0, hvFd, managerRunDir: mgrDir, xenDir });
  started.push(d);
  return d;
}

async function instanceFor(version: '2.0' | '1.2'): Promise<number> {
  return (await mgr.open({ vmUuid: crypto.randomUUID(), version })).instance;
}

describe('vTPM-domain process', () => {
  it('runs lean: one shared malloc arena and a libuv pool of DOMAIN_THREADPOOL_SIZE, whatever the backend has', async () => {
    const instance = await instanceFor('2.0');
    const dom = await startDomain(instance, '2.0');
    expect(await dom.startup('clear')).toBe(0);
    // A key generation runs on the pool, so the pool has started all its threads.
    tpm2.expectSuccess(await dom.execute(tpm2.createPrimaryRsa(2048)), 'CreatePrimary');
    const env = fs.readFileSync(`/proc/${dom.pid}/environ`, 'latin1').split('\0');
    expect(env).toContain('MALLOC_ARENA_MAX=1');
    expect(env).toContain(`UV_THREADPOOL_SIZE=${DOMAIN_THREADPOOL_SIZE}`);
    // Node's own threads (V8 platform workers, signal watchdog) plus the pool; 16 pool threads before.
    const threads = fs.readdirSync(`/proc/${dom.pid}/task`).length;
    expect(threads).toBeLessThanOrEqual(8 + DOMAIN_THREADPOOL_SIZE);
  });

  it('starts, answers health, runs TPM commands over the ring, stops cleanly, and resumes its saved state', async () => {
    const instance = await instanceFor('2.0');
    const dom = await startDomain(instance, '2.0');
    const h = await dom.health();
    expect(h).toMatchObject({ instance, domid: dom.domid, pid: dom.pid, version: '2.0', status: 'running' });
    expect(dom.pid).not.toBe(process.pid);
    expect(await dom.startup('clear')).toBe(0);
    await dom.execute(tpm2.pcrExtendSha256(16, unhex('42'.repeat(32))));
    const pcr = tpm2.parsePcrRead(await dom.execute(tpm2.pcrReadSha256(16)));
    // Bad input is answered, not fatal, across the process boundary too.
    expect(hex(await dom.execute(unhex('8001 00000020 0000017b 0008')))).toBe('80010000000a00000142');
    await dom.saveVolatile();
    const perm = await dom.getStateBlob('permanent');
    expect(hex(perm!.subarray(0, 6))).toBe('0201000a0004');
    const exits: DomainExit[] = [];
    dom.on('exit', (e: DomainExit) => exits.push(e));
    const crash: DomainExit[] = [];
    dom.on('crash', (e: DomainExit) => crash.push(e));
    expect(await dom.stop()).toEqual({ code: 0, signal: null, expected: true });
    expect(exits).toHaveLength(1);
    expect(crash).toHaveLength(0);

    // A new domain on the same state resumes the saved volatile state: same PCR, no Startup needed.
    const again = await startDomain(instance, '2.0');
    expect(hex(tpm2.parsePcrRead(await again.execute(tpm2.pcrReadSha256(16))))).toBe(hex(pcr));
  });

  it('reports kill -9 as a crash and fails pending requests', async () => {
    const dom = await startDomain(await instanceFor('1.2'), '1.2');
    expect(await dom.startup('clear')).toBe(0);
    const crashed = new Promise<DomainExit>((r) => dom.once('crash', r));
    const pending = dom.health(10_000).catch((e: unknown) => e);
    process.kill(dom.pid, 'SIGKILL');
    expect(await crashed).toEqual({ code: null, signal: 'SIGKILL', expected: false });
    const err = await pending;
    // Either the kill beat the request (CRASHED) or the domain answered first; never a hang.
    if (err instanceof DomainError) expect(err.code).toBe('CRASHED');
    await expect(dom.health()).rejects.toMatchObject({ code: 'CRASHED' });
    expect(dom.alive).toBe(false);
  });

  it('answers a request id it completed from its exactly-once table, across a kill -9', async () => {
    const instance = await instanceFor('2.0');
    const dom = await startDomain(instance, '2.0');
    expect(await dom.startup('clear')).toBe(0);
    const extend = tpm2.pcrExtendSha256(16, unhex('07'.repeat(32)));
    const first = await dom.execute(extend, { id: 41n });
    const once = tpm2.parsePcrRead(await dom.execute(tpm2.pcrReadSha256(16), { id: 42n }));
    process.kill(dom.pid, 'SIGKILL');
    await dom.exited();
    // The next incarnation powers on from the checkpoint that answered id 42: PCRs kept, and id 41
    // resubmitted gets its stored answer instead of a second extend.
    const next = await startDomain(instance, '2.0');
    expect(hex(await next.execute(extend, { id: 41n }))).toBe(hex(first));
    expect(hex(tpm2.parsePcrRead(await next.execute(tpm2.pcrReadSha256(16), { id: 43n })))).toBe(hex(once));
    // Without an id (0) the same bytes run again: a second extend.
    await next.execute(extend);
    expect(hex(tpm2.parsePcrRead(await next.execute(tpm2.pcrReadSha256(16), { id: 44n })))).not.toBe(hex(once));
  });

  it('the entry point speaks the lifecycle framing on stdio: READY first, then replies by id', async () => {
    const instance = await instanceFor('2.0');
    const domid = nextDomid++;
    const front = new RingFront(dom0, domid, { segments: 1 });
    const hvFd = await createDomainConnection({ domid, dir: xenDir });
    // prettier-ignore
    const args = [VTPM_DOMAIN_MAIN, '--instance', String(instance), '--domid', String(domid), '--manager-run', mgrDir,
      '--xen-dir', xenDir, '--ring-ref', String(front.refs[0]), '--event-channel', String(front.port)];
    const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'inherit', hvFd], env: { ...engineEnv(), VTPM_HV_FD: '3' } });
    fs.closeSync(hvFd);
    const reader = new FrameReader();
    const frames: Array<{ type: number; id: number; payload: Uint8Array }> = [];
    child.stdout!.on('data', (c: Buffer) => frames.push(...reader.push(new Uint8Array(c))));
    const waitFor = async (n: number) => {
      while (frames.length < n) await new Promise((r) => setTimeout(r, 5));
    };
    try {
      await waitFor(1);
      expect(frames[0]!.type).toBe(DomainMsg.READY);
      expect(JSON.parse(Buffer.from(frames[0]!.payload).toString())).toMatchObject({ instance, domid });
      // STARTUP id 0x01020304, CLEAR: frame bytes spelled out; the reply carries the response code.
      const frame = encodeFrame(DomainMsg.STARTUP, 0x01020304, Uint8Array.of(0));
      expect(hex(frame)).toBe('00000006' + '0b' + '01020304' + '00');
      child.stdin!.write(frame);
      await waitFor(2);
      expect(frames[1]).toMatchObject({ type: DomainMsg.OK, id: 0x01020304 });
      expect(hex(frames[1]!.payload)).toBe('00000000');
      // The removed stdio command path is refused as an unknown type: commands go over the ring only.
      const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
      child.stdin!.write(unhex('0000000e 01 00000001 00 8001 0000000c 00000144 0000'.replace(/ /g, '')));
      await waitFor(3);
      expect(frames[2]!.type).toBe(DomainMsg.ERROR);
      expect(JSON.parse(Buffer.from(frames[2]!.payload).toString())).toMatchObject({ code: 'BAD_TYPE' });
      expect(await exited).toBe(2);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      await front.close();
    }
  });
});
