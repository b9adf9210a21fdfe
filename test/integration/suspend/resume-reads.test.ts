// The backend's xenstore reads on the resume path, counted from its trace (VTPM_TRACE_DIR, src/util/trace.ts)
// on a real host of its own: after a suspend notice on the ring, the frontend's ring keys read with its
// Initialised are the ones the backend attaches with, not read a second and third time.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { dist } from '../../helpers/child.js';
import { removeDir, tempDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const cli = dist('src/cli/main.js');
const traceDir = tempDir('resume-trace');
const env = { ...process.env, VTPM_NO_SETUP: '1', VTPM_TRACE_DIR: traceDir };
const vtpm = (...args: string[]) => run(process.execPath, [cli, ...args], { env });

type XsClient = import('../../../src/xenstore/client.js').XsClient;

const { Domain } = (await import(dist('src/xen/index.js'))) as typeof import('../../../src/xen/index.js');
const { connect } = (await import(dist('src/xenstore/client.js'))) as typeof import('../../../src/xenstore/client.js');
const xenbus = (await import(dist('src/xenstore/xenbus.js'))) as typeof import('../../../src/xenstore/xenbus.js');
const xenbusFront = (await import(dist('src/xenstore/xenbus-frontend.js'))) as typeof import('../../../src/xenstore/xenbus-frontend.js');
const xenbusTool = (await import(dist('src/xenstore/xenbus-toolstack.js'))) as typeof import('../../../src/xenstore/xenbus-toolstack.js');
const tpm2 = (await import(dist('src/tpm/tpm2-commands.js'))) as typeof import('../../../src/tpm/tpm2-commands.js');
const wire = (await import(dist('src/tpm/wire.js'))) as typeof import('../../../src/tpm/wire.js');
const { RunDir } = (await import(dist('src/cli/rundir.js'))) as typeof import('../../../src/cli/rundir.js');
const { RingFront } = (await import(dist('src/tpmif/ring-front.js'))) as typeof import('../../../src/tpmif/ring-front.js');
const { XS_FEATURE_RING } = (await import(dist('src/xen/tpmif.js'))) as typeof import('../../../src/xen/tpmif.js');

const base = tempDir('resume-reads');
const runDir = join(base, 'run');
let dom0: XsClient;

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(base, 'state'));
  dom0 = await connect(new RunDir(runDir).readHost().xenstoredSocket);
});

afterAll(async () => {
  await dom0?.close().catch(() => {});
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(base);
  removeDir(traceDir);
});

/** The backend's trace lines so far (written every 200 ms). */
function backendLines(): string[] {
  for (const f of readdirSync(traceDir)) {
    const text = readFileSync(join(traceDir, f), 'utf8');
    if (/^\d+ start \S+ backend /.test(text)) return text.split('\n');
  }
  throw new Error('no backend trace');
}

/** The backend's xenstore requests so far. */
function backendRequests(): string[] {
  return backendLines().filter((l) => / xc > /.test(l));
}

/**
 * Guest `domid` on the ring, connected and started up, then told to suspend (control/shutdown): the
 * test takes it from there. The caller closes `xs` and destroys `dom`.
 */
async function suspendingGuest(domid: number) {
  const h = new RunDir(runDir).readHost();
  await dom0.introduce(domid);
  await xenbusTool.writeDeviceDirectories(dom0, { frontDomid: domid, backDomid: 0, devid: 0, uuid: `00000000-0000-4000-8000-0000000000${domid}` });
  const dom = await Domain.create({ domid, dir: h.xenDir });
  const xs = await connect(join(h.domainSocketDir, `dom${domid}.sock`));
  const dev = xenbus.vtpmDevice(domid, 0, 0);
  const ringOpts = { timeoutMs: 10_000, requireBackendFeature: XS_FEATURE_RING };
  const f1 = new RingFront(dom, 0);
  await xenbusFront.frontendConnect(xs, dev, { ringRef: f1.refs[0]!, eventChannel: f1.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts);
  expect(wire.responseCode(await f1.transmit(tpm2.startup()))).toBe(0);
  await dom0.write(`/local/domain/${domid}/control/shutdown`, 'suspend');
  return { domid, dom, xs, dev, ringOpts, f1 };
}

describe('resume after a suspend notice', () => {
  it("the backend attaches the new ring with the keys read alongside the frontend's Initialised (one read of ring-ref before its Connected), and signals the new port before xenstored answers that Connected", async () => {
    const { domid, dom, xs, dev, ringOpts, f1 } = await suspendingGuest(41);
    try {
      // The notice alone: the backend answers it, goes Closing and takes the ring down.
      expect(await f1.announceSuspend()).toBe(true);
      await xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.Closing, { timeoutMs: 10_000 });
      await f1.close();
      await dom0.write(`/local/domain/0/backend/vtpm/${domid}/0/resume`, 'True');
      await dom0.write(`/local/domain/${domid}/control/shutdown`, '');
      await sleep(500);
      const before = backendRequests().length;
      const linesBefore = backendLines().length;
      // Closed, Initialising, the new ring and Initialised in one batch: the backend's first read of our
      // state after it says Initialised.
      const f2 = new RingFront(dom, 0, { firstId: f1.nextId });
      await Promise.all([
        xenbus.switchState(xs, dev.frontend, xenbus.XenbusState.Closed),
        xenbusFront.frontendReconnect(xs, dev, { ringRef: f2.refs[0]!, eventChannel: f2.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts),
      ]);
      expect(tpm2.parseGetRandom(await f2.transmit(tpm2.getRandom(8)))).toHaveLength(8);
      await sleep(500);
      // From the frontend's Initialised to the backend's Connected.
      const resume = backendRequests().slice(before);
      const connected = resume.findIndex((l) => l.endsWith(` ${dev.backend}/state|${xenbus.XenbusState.Connected}`));
      expect(connected).toBeGreaterThan(0);
      expect(resume.slice(0, connected).filter((l) => l.endsWith(` ${dev.frontend}/ring-ref|`))).toHaveLength(1);
      // The new port is signalled once that WRITE has left, before xenstored's answer to it comes back.
      const lines = backendLines().slice(linesBefore);
      const write = lines.find((l) => l.endsWith(` ${dev.backend}/state|${xenbus.XenbusState.Connected}`))!;
      const id = / xc > WRITE (\d+) /.exec(write)![1];
      const signalled = lines.findIndex((l) => l.endsWith(' dev connected signalled'));
      expect(signalled).toBeGreaterThan(lines.indexOf(write));
      expect(lines.findIndex((l) => new RegExp(` xc < WRITE ${id} *$`).test(l))).toBeGreaterThan(signalled);
      await f2.close();
    } finally {
      await xs.close();
      await dom.destroy();
    }
  });

  it("the frontend's Closing and Closed after a suspend notice cost the backend one read of its state each, without the eight attach keys; the Initialised behind them brings the keys", async () => {
    const { domid, dom, xs, dev, ringOpts, f1 } = await suspendingGuest(42);
    const reads = (from: number, key: string) => backendRequests().slice(from).filter((l) => l.endsWith(` ${dev.frontend}/${key}|`)).length;
    try {
      expect(await f1.announceSuspend()).toBe(true);
      await xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.Closing, { timeoutMs: 10_000 });
      await sleep(300);
      const before = backendRequests().length;
      // Closing and Closed apart, each read by the backend on its own.
      await xenbus.switchState(xs, dev.frontend, xenbus.XenbusState.Closing);
      await sleep(300);
      await xenbus.switchState(xs, dev.frontend, xenbus.XenbusState.Closed);
      await f1.close();
      await xenbus.waitForState(dom0, dev.backend, (st) => st === xenbus.XenbusState.InitWait, { timeoutMs: 10_000 });
      await sleep(500);
      expect(reads(before, 'state')).toBe(2);
      for (const key of ['ring-ref', 'event-channel', XS_FEATURE_RING]) expect(reads(before, key)).toBe(0);
      expect(backendRequests().slice(before).filter((l) => l.endsWith(`${dev.backend}/uuid|`))).toHaveLength(0);
      // The resume: one read of the new ring's keys, with its Initialised.
      await dom0.write(`/local/domain/0/backend/vtpm/${domid}/0/resume`, 'True');
      await dom0.write(`/local/domain/${domid}/control/shutdown`, '');
      const mid = backendRequests().length;
      const f2 = new RingFront(dom, 0, { firstId: f1.nextId });
      await xenbusFront.frontendReconnect(xs, dev, { ringRef: f2.refs[0]!, eventChannel: f2.port, extra: { [XS_FEATURE_RING]: '1' } }, ringOpts);
      expect(tpm2.parseGetRandom(await f2.transmit(tpm2.getRandom(8)))).toHaveLength(8);
      await sleep(500);
      const resume = backendRequests().slice(mid);
      const connected = resume.findIndex((l) => l.endsWith(` ${dev.backend}/state|${xenbus.XenbusState.Connected}`));
      expect(connected).toBeGreaterThan(0);
      expect(resume.slice(0, connected).filter((l) => l.endsWith(` ${dev.frontend}/ring-ref|`))).toHaveLength(1);
      await f2.close();
    } finally {
      await xs.close();
      await dom.destroy();
    }
  });
});
