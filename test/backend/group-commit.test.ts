// Group commit of one guest's ring requests: the single-VM backend's pieces (RingChannel, InProcessVtpms
// on libtpms) in this process, over the emulated hypervisor, with a real manager process keeping the
// vTPM's state. The manager client is the real one; the test only counts the checkpoints (volatile
// stores and holds) going through it and can hold them back, to see what is answered before they are held.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { dist, freshXenDir } from '../helpers/child.js';
import { Domain } from '../../src/xen/index.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import { InProcessVtpms } from '../../src/backend/single-vm.js';
import type { ExactlyOnce } from '../../src/backend/exactly-once.js';
import type { VtpmSession } from '../../src/backend/provider.js';
import { ManagerClient } from '../../src/manager/client.js';
import { TpmHost } from '../../src/tpm/host.js';
import type { StateKind } from '../../src/tpm/state-store.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import * as wire from '../../src/tpm/wire.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const { startDaemon, stopProcess } = (await import(dist('src/cli/spawn.js'))) as typeof import('../../src/cli/spawn.js');

const xenDir = freshXenDir();
const base = tempDir('group');
const stateDir = join(base, 'state');
const managerRun = join(base, 'manager');
let managerPid = 0;
let dom0: Domain;
let nextDomid = 40;

async function startManager(): Promise<void> {
  managerPid = (await startDaemon(['manager', '--state', stateDir, '--run', managerRun], join(base, 'manager.log'), /vtpm-manager: ready/)).pid;
}

/** The real manager client; volatile stores (the checkpoints) are counted and can be held at a gate. */
class Checkpoints {
  count = 0;
  /** Of them: whole checkpoints held, and replay records appended to one. */
  holds = 0;
  appends = 0;
  /** The manager's refusal of this many appends to come (as after a restart that lost the held base). */
  refuseAppends = 0;
  #gate: Promise<void> | null = null;
  #open = (): void => {};

  wrap(mgr: ManagerClient): ManagerClient {
    return new Proxy(mgr, {
      get: (t, p) => {
        if (p === 'store') {
          return async (instance: number, kind: StateKind, blob: Uint8Array): Promise<void> => {
            if (kind === 'volatile') {
              this.count++;
              if (this.#gate) await this.#gate;
            }
            return t.store(instance, kind, blob);
          };
        }
        // A checkpoint held in the manager's memory (HOLD_VOLATILE, or records appended to it) is one too.
        if (p === 'holdVolatile' || p === 'appendVolatile') {
          return async (instance: number, blob: Uint8Array): Promise<void> => {
            this.count++;
            if (p === 'holdVolatile') this.holds++;
            else this.appends++;
            if (this.#gate) await this.#gate;
            if (p === 'appendVolatile' && this.refuseAppends > 0 && this.refuseAppends--) throw new Error('APPEND_VOLATILE refused (test)');
            return p === 'holdVolatile' ? t.holdVolatile(instance, blob) : t.appendVolatile(instance, blob);
          };
        }
        const v = Reflect.get(t, p, t) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
      },
    });
  }

  hold(): void {
    this.#gate = new Promise((r) => (this.#open = r));
  }

  release(): void {
    this.#gate = null;
    this.#open();
  }
}

interface Rig {
  vm: string;
  target: VtpmSession;
  host: TpmHost;
  mgr: ManagerClient;
  front: RingFront;
  ch: RingChannel;
  guest: Domain;
  cps: Checkpoints;
  vtpms: InProcessVtpms;
  instance: number;
  logs: string[];
  close(): Promise<void>;
}

async function rig(): Promise<Rig> {
  const cps = new Checkpoints();
  const mgr = await ManagerClient.connect(managerRun, { name: `group-test-${nextDomid}` });
  const host = new TpmHost();
  const logs: string[] = [];
  const vtpms = new InProcessVtpms(host, cps.wrap(mgr), (l) => logs.push(l));
  const vm = randomUUID();
  const target = await vtpms.open(vm, '2.0', { resume: false });
  const guest = await Domain.create({ domid: nextDomid++, dir: xenDir });
  const front = new RingFront(guest, 0);
  const ch = new RingChannel(dom0, { frontDomid: guest.domid, refs: [...front.refs], port: front.port, target, onFatal: () => {} });
  return {
    vm,
    target,
    host,
    mgr,
    front,
    ch,
    guest,
    cps,
    vtpms,
    instance: target.instance,
    logs,
    async close() {
      ch.close();
      await front.close();
      await vtpms.release(target.instance);
      await host.destroyAll();
      mgr.disconnect();
      await guest.destroy();
    },
  };
}

const ok = (r: Uint8Array): Uint8Array => {
  expect(wire.responseCode(r)).toBe(0);
  return r;
};
const extendModel = (model: Buffer, d: Uint8Array): Buffer => createHash('sha256').update(Buffer.concat([model, d])).digest();
const pcr16 = async (front: RingFront): Promise<string> => Buffer.from(tpm2.parsePcrRead(ok(await front.transmit(tpm2.pcrReadSha256(16))))).toString('hex');

beforeAll(async () => {
  await startManager();
  dom0 = await Domain.create({ domid: 0, dir: xenDir });
});

afterAll(async () => {
  await dom0?.destroy();
  if (managerPid) await stopProcess(managerPid);
  removeDir(xenDir);
  removeDir(base);
});

describe("group commit of a guest's outstanding ring requests", () => {
  it('runs requests outstanding together under one checkpoint and answers none before it is durable', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const before = r.cps.count;
      // Hold the checkpoints: the first group runs, then waits for its store; the rest queue up.
      r.cps.hold();
      const digests = Array.from({ length: 24 }, () => randomBytes(32));
      let answered = 0;
      const pending = digests.map((d) => r.front.transmit(tpm2.pcrExtendSha256(16, d)).then((rsp) => (answered++, rsp)));
      await sleep(150);
      expect(answered).toBe(0);
      expect(r.cps.count - before).toBe(1);
      r.cps.release();
      for (const p of pending) ok(await p);
      // The first group (whatever had arrived when it started) and one group for everything that
      // queued up behind its checkpoint: 24 extends, at most two checkpoints.
      expect(r.cps.count - before).toBeLessThanOrEqual(2);
      const model = digests.reduce(extendModel, Buffer.alloc(32));
      expect(await pcr16(r.front)).toBe(model.toString('hex'));
    } finally {
      r.cps.release();
      await r.close();
    }
  });

  it('appends 64 extends to a held checkpoint, then holds a whole one again, and the PCR is right throughout', async () => {
    // The manager writes a guest's whole held checkpoint each second: a short tail of records keeps
    // that write small, for one VolatileAll_Store per REPLAY_PER_FULL extends.
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const [holds, appends] = [r.cps.holds, r.cps.appends];
      const digests = Array.from({ length: 130 }, () => randomBytes(32));
      for (const d of digests) ok(await r.front.transmit(tpm2.pcrExtendSha256(16, d)));
      // Extends 1-64 and 66-129 are appended; 65 and 130 find 64 records after the held copy and hold a new one.
      expect([r.cps.holds - holds, r.cps.appends - appends]).toEqual([2, 128]);
      expect(await pcr16(r.front)).toBe(digests.reduce(extendModel, Buffer.alloc(32)).toString('hex'));
    } finally {
      await r.close();
    }
  });

  it('runs a lone PCR_Extend in libtpms in the tick its group starts, and answers it once its record is held', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const s = r.target as ExactlyOnce;
      const appends = r.cps.appends;
      const d = randomBytes(32);
      const id = r.front.nextId + 1000n;
      let answered = false;
      r.cps.hold();
      const group = s.executeGroup({ id, command: tpm2.pcrExtendSha256(16, d), locality: 0 }, () => undefined, () => 0).then((a) => ((answered = true), a));
      // Before any promise reaction ran: libtpms extended the PCR (a read run now shows it), and the
      // id is recorded but not answered from the table until the manager holds it.
      const now = s.inst.executeNow(tpm2.pcrReadSha256(16), 0);
      expect(now).toBeInstanceOf(Uint8Array);
      expect(Buffer.from(tpm2.parsePcrRead(ok(now as Uint8Array))).toString('hex')).toBe(extendModel(Buffer.alloc(32), d).toString('hex'));
      expect(s.completed(id)).toBeUndefined();
      await sleep(100);
      expect(answered).toBe(false);
      r.cps.release();
      ok((await group)[0]!);
      expect(r.cps.appends - appends).toBe(1);
      expect(s.completed(id)?.status).toBe(0);
    } finally {
      r.cps.release();
      await r.close();
    }
  });

  it('holds a whole checkpoint of what ran when an append is refused, and the extend is counted once', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const a = randomBytes(32);
      ok(await r.front.transmit(tpm2.pcrExtendSha256(16, a)));
      const [holds, appends] = [r.cps.holds, r.cps.appends];
      r.cps.refuseAppends = 1;
      const b = randomBytes(32);
      ok(await r.front.transmit(tpm2.pcrExtendSha256(16, b)));
      // The refused append, then a whole checkpoint held in its place (the extend not run again).
      expect([r.cps.holds - holds, r.cps.appends - appends]).toEqual([1, 1]);
      expect(r.logs.some((l) => l.includes('APPEND_VOLATILE refused (test)'))).toBe(true);
      expect(await pcr16(r.front)).toBe([a, b].reduce(extendModel, Buffer.alloc(32)).toString('hex'));
    } finally {
      await r.close();
    }
  });

  it('does not hold an answer back behind a slow command: GetRandom ahead of a key generation is answered first', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const before = r.cps.count;
      const order: string[] = [];
      const random = r.front.transmit(tpm2.getRandom(16)).then((rsp) => (order.push('GetRandom'), rsp));
      const key = r.front.transmit(tpm2.createPrimaryRsa(2048, randomBytes(16))).then((rsp) => (order.push('CreatePrimary'), rsp));
      ok(await random);
      ok(await key);
      expect(order).toEqual(['GetRandom', 'CreatePrimary']);
      // GetRandom changes nothing a restore needs (the DRBG is stirred after one): no checkpoint of its own.
      expect(r.cps.count - before).toBe(1);
    } finally {
      await r.close();
    }
  });

  it('a suspend checkpoint after only reads stores nothing; one after an extend stores the state durably', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      ok(await r.front.transmit(tpm2.pcrExtendSha256(16, randomBytes(32))));
      await r.target.checkpoint!();
      const durable = r.cps.count;
      // Reads since that durable checkpoint: GetRandom, PCR_Read, GetCapability (effect 'none').
      ok(await r.front.transmit(tpm2.getRandom(16)));
      await pcr16(r.front);
      ok(await r.front.transmit(tpm2.getHandles(0x80000000)));
      await r.target.checkpoint!();
      expect(r.cps.count).toBe(durable);
      // An extend changes volatile state: its suspend stores again (held first, then made durable).
      ok(await r.front.transmit(tpm2.pcrExtendSha256(16, randomBytes(32))));
      const afterExtend = r.cps.count;
      await r.target.checkpoint!();
      expect(r.cps.count).toBe(afterExtend + 1);
    } finally {
      await r.close();
    }
  });

  it('a backend that dies loses nothing held: a new one resumes the extends appended at the manager and answers their ids again', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const digests = Array.from({ length: 5 }, () => randomBytes(32));
      const first = r.front.nextId;
      const answers: Uint8Array[] = [];
      for (const d of digests) answers.push(ok(await r.front.transmit(tpm2.pcrExtendSha256(16, d))));
      ok(await r.front.transmit(tpm2.getRandom(8)));
      // The backend dies: nothing saved on the way out, its manager pair simply gone.
      r.ch.close();
      await r.host.destroyAll();
      r.mgr.disconnect();
      const mgr = await ManagerClient.connect(managerRun, { name: `group-test-after-${nextDomid}` });
      const host = new TpmHost();
      const vtpms = new InProcessVtpms(host, mgr, () => {});
      const target = await vtpms.open(r.vm, '2.0', { resume: true });
      try {
        // Id of the third extend resubmitted: its stored answer, nothing run again.
        expect(target.completed!(first + 2n)?.response).toEqual(answers[2]);
        const pcr = await target.execute(tpm2.pcrReadSha256(16), { locality: 0 });
        const model = digests.reduce(extendModel, Buffer.alloc(32));
        expect(Buffer.from(tpm2.parsePcrRead(ok(pcr))).toString('hex')).toBe(model.toString('hex'));
      } finally {
        await vtpms.release(target.instance);
        await host.destroyAll();
        mgr.disconnect();
      }
    } finally {
      await r.front.close();
      await r.guest.destroy();
    }
  });

  it('answers a group whose checkpoint met a killed manager once the restarted one holds it: each extend counted once', async () => {
    const r = await rig();
    try {
      ok(await r.front.transmit(tpm2.startup()));
      const a = randomBytes(32);
      ok(await r.front.transmit(tpm2.pcrExtendSha256(16, a)));
      // The group runs in libtpms and its checkpoint is held; the manager dies under it.
      r.cps.hold();
      const digests = Array.from({ length: 10 }, () => randomBytes(32));
      const pending = digests.map((d) => r.front.transmit(tpm2.pcrExtendSha256(16, d)));
      await sleep(100);
      process.kill(managerPid, 'SIGKILL');
      await sleep(50);
      r.cps.release();
      // The client re-holds its last checkpoint on the restarted manager, then this group's (or, if
      // the hold failed, the backend re-runs the group from the last checkpoint): either way once.
      await sleep(100);
      await startManager();
      for (const p of pending) ok(await p);
      const model = [a, ...digests].reduce(extendModel, Buffer.alloc(32));
      expect(await pcr16(r.front)).toBe(model.toString('hex'));
    } finally {
      r.cps.release();
      await r.close();
    }
  });
});
