// `host up --mode stubdom`: each guest's vTPM domain is its device's backend (Xen 4.x layout). A real
// host under per-domain uids with three guests (v2, ring, v2) on tpm2-tools' TCTI: where the device
// lives and who may touch it, suspend/resume, kill -9 of one domain (only its guest sees a failure
// answer, then a fresh TPM; the others stay under the 2 s bound), detach, and dom0's backend dying.
import { afterAll, beforeAll, beforeEach, describe, expect, it, onTestFailed } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePortPair } from '../../../src/cli/ports.js';
import { connect, XsError } from '../../../src/xenstore/client.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import { DataClient, dumpLogs, rc, run, status, tcti, vtpm, type Proc } from '../multivm/host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { domainNodeFlags } from '../../../src/backend/domain-flags.js';

const STALL_BOUND_MS = 2000;
// Under /var/tmp in a 0711 directory: domains under their own uids must reach their sockets.
const work = tempDir('stubdom', '/var/tmp');
fs.chmodSync(work, 0o711);
const runDir = join(work, 'run');
// A uid range of its own (`host down` stops every process of a domain's uid).
const uidBase = 0x60000000 + ((process.pid & 0xfff) << 16);
const guests: Array<{ domid: number; vm: string; port: number; protocol: 'v2' | 'ring' }> = [];

const domainOf = async (vm: string): Promise<Proc> => (await status(runDir)).processes.find((p) => p.role === 'vtpm-domain' && p.vm === vm)!;
const xsRead = async (sock: string, path: string): Promise<string | XsError> => {
  const xs = await connect(sock);
  try {
    return await xs.readString(path);
  } catch (err) {
    if (err instanceof XsError) return err;
    throw err;
  } finally {
    await xs.close();
  }
};

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', 'stubdom', '--isolation', 'uid', '--uid-base', String(uidBase));
  for (const [domid, protocol] of [
    [1, 'v2'],
    [2, 'ring'],
    [3, 'v2'],
  ] as const) {
    const g = { domid, vm: randomUUID(), port: await freePortPair(), protocol };
    await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', g.vm, '--protocol', protocol, '--tcti-port', String(g.port));
    guests.push(g);
  }
});

beforeEach(() => onTestFailed(() => dumpLogs(runDir)));

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('stub-domain layout', () => {
  it('puts each device under its own vTPM domain, which runs under its own uid and reaches only what a Xen stub domain may', async () => {
    const s = await status(runDir);
    expect(s.mode).toBe('stubdom');
    const doms = s.processes.filter((p) => p.role === 'vtpm-domain');
    expect(doms).toHaveLength(3);
    const xs = await connect(join(runDir, 'xenstored.sock'));
    try {
      for (const g of guests) {
        const d = doms.find((p) => p.vm === g.vm)!;
        expect(d.domid).toBeGreaterThanOrEqual(0x7000);
        expect((d as Proc & { uid: number }).uid).toBe(uidBase + d.domid);
        // A lean domain (docs/multi-vm.md): node runs it with the domain flags before the entry script.
        const argv = fs.readFileSync(`/proc/${d.pid}/cmdline`, 'utf8').split('\0');
        const script = argv.findIndex((a) => a.endsWith('stubdom-main.js'));
        expect(script).toBeGreaterThan(0);
        // (isolation adds its seccomp preload, an --import, among them)
        expect(argv.slice(1, script)).toEqual(expect.arrayContaining(domainNodeFlags()));
        // The toolstack wrote the device with backend-id = the vTPM domain, as xl does under Xen 4.x.
        const fe = `/local/domain/${g.domid}/device/vtpm/0`;
        const be = `/local/domain/${d.domid}/backend/vtpm/${g.domid}/0`;
        expect(await xs.readString(`${fe}/backend-id`)).toBe(String(d.domid));
        expect(await xs.readString(`${fe}/backend`)).toBe(be);
        expect(await xs.readString(`${be}/state`)).toBe('4');
        expect(await xs.readString(`${fe}/state`)).toBe('4');
        expect(await xs.readString(`${be}/uuid`)).toBe(g.vm);
        expect(await xs.getPerms(be)).toEqual([{ domid: d.domid, access: 'n' }, { domid: g.domid, access: 'r' }]);
        expect(await xs.getPerms(fe)).toEqual([{ domid: g.domid, access: 'n' }, { domid: d.domid, access: 'r' }]);
        // Nothing of it is left under dom0's backend directory.
        expect(await xs.tryRead(`/local/domain/0/backend/vtpm/${g.domid}/0/state`)).toBeUndefined();
      }
    } finally {
      await xs.close();
    }
    // Through domain 1's vTPM domain's own socket: its backend dir and its guest's frontend, nothing else.
    const [a, b] = [doms.find((p) => p.vm === guests[0]!.vm)!, doms.find((p) => p.vm === guests[1]!.vm)!];
    const sock = join(runDir, 'xs', `dom${a.domid}.sock`);
    expect(fs.statSync(sock).uid).toBe(uidBase + a.domid);
    expect(await xsRead(sock, `/local/domain/${a.domid}/backend/vtpm/1/0/state`)).toBe('4');
    expect(await xsRead(sock, '/local/domain/1/device/vtpm/0/backend-id')).toBe(String(a.domid));
    const refused = [
      '/local/domain/2/device/vtpm/0/ring-ref', // another guest's frontend
      `/local/domain/${b.domid}/backend/vtpm/2/0/state`, // another vTPM domain's device
      '/local/domain/0/backend/vtpm-stubdom/1/0/uuid', // dom0's lifecycle node
      '/local/domain/1/control/shutdown', // its guest's control node
    ];
    for (const p of refused) expect(await xsRead(sock, p), p).toMatchObject({ code: expect.stringMatching(/^(EACCES|ENOENT)$/) });
    const xsA = await connect(sock);
    try {
      await expect(xsA.write('/local/domain/2/device/vtpm/0/state', '6')).rejects.toMatchObject({ code: 'EACCES' });
      await expect(xsA.introduce(0x7100)).rejects.toMatchObject({ code: 'EACCES' });
    } finally {
      await xsA.close();
    }
  });

  it('serves tpm2-tools through the guest\'s TCTI bridge, NV included', async () => {
    const g = guests[0]!;
    await run('tpm2_startup', ['-c'], { env: tcti(g.port) }).catch(() => undefined); // the guest started it already
    fs.writeFileSync(join(work, 'nv.in'), 'served by a stub domain');
    await run('tpm2_nvdefine', ['0x1500021', '-C', 'o', '-s', '32', '-a', 'ownerread|ownerwrite'], { env: tcti(g.port) });
    await run('tpm2_nvwrite', ['0x1500021', '-C', 'o', '-i', join(work, 'nv.in')], { env: tcti(g.port) });
    const nv = await run('tpm2_nvread', ['0x1500021', '-C', 'o', '-s', '23'], { env: tcti(g.port) });
    expect(nv.stdout).toBe('served by a stub domain');
  });
});

describe('the lifecycle request', () => {
  it('refuses a request whose uuid or tpm-version is bad: the reason in error, state 6, no domain started', async () => {
    const xs = await connect(join(runDir, 'xenstored.sock'));
    try {
      const cases = [
        { fe: 60, uuid: 'not-a-uuid\u0007', version: '2.0', why: /uuid is not a lower-case UUID/ },
        { fe: 61, uuid: randomUUID(), version: '3.0', why: /tpm-version must be 2.0 or 1.2/ },
      ];
      const before = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain').length;
      for (const c of cases) {
        const node = `/local/domain/0/backend/vtpm-stubdom/${c.fe}/0`;
        await xs.transaction(async (tx) => {
          await xs.write(`${node}/uuid`, c.uuid, tx);
          await xs.write(`${node}/tpm-version`, c.version, tx);
          await xs.write(`${node}/state`, '1', tx);
        });
        const deadline = Date.now() + 10_000;
        while ((await xs.tryRead(`${node}/state`)) !== '6' && Date.now() < deadline) await sleep(20);
        expect(await xs.tryRead(`${node}/state`)).toBe('6');
        expect(await xs.tryRead(`${node}/error`)).toMatch(c.why);
        expect(await xs.tryRead(`${node}/domid`)).toBeUndefined();
        await xs.rm(`/local/domain/0/backend/vtpm-stubdom/${c.fe}`);
      }
      expect((await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain')).toHaveLength(before);
    } finally {
      await xs.close();
    }
  });
});

describe('suspend and resume', () => {
  it('keeps the vTPM (PCRs, request ids) across a ring guest\'s suspend; the same domain serves the new ring', async () => {
    const g = guests[1]!;
    const before = await domainOf(g.vm);
    const c = await DataClient.connect(g.port);
    expect(rc(await c.transmit(tpm2.pcrExtendSha256(16, new Uint8Array(32).fill(7))))).toBe(0);
    const pcr = tpm2.parsePcrRead(await c.transmit(tpm2.pcrReadSha256(16)));
    c.close();
    await vtpm('guest', 'suspend', '--run', runDir, '--domid', String(g.domid));
    await vtpm('guest', 'resume', '--run', runDir, '--domid', String(g.domid));
    const c2 = await DataClient.connect(g.port);
    expect(tpm2.parsePcrRead(await c2.transmit(tpm2.pcrReadSha256(16)))).toEqual(pcr);
    c2.close();
    const after = await domainOf(g.vm);
    expect(after).toMatchObject({ domid: before.domid, pid: before.pid, alive: true });
  });
});

describe('kill -9 of one vTPM domain', () => {
  it('answers its guest\'s command in flight with TPM_RC_FAILURE, restarts it from durable state as a fresh TPM, and stalls nobody else', async () => {
    const victim = guests[0]!;
    const others = guests.slice(1);
    const dead = await domainOf(victim.vm);
    let stop = false;
    const samples: Array<{ ms: number; rc: number }> = [];
    const errors: string[] = [];
    const loops = others.flatMap((g) =>
      Array.from({ length: 2 }, async () => {
        const c = await DataClient.connect(g.port);
        try {
          while (!stop) {
            const t0 = performance.now();
            try {
              const r = await c.transmit(tpm2.getRandom(16), STALL_BOUND_MS * 5);
              samples.push({ ms: performance.now() - t0, rc: rc(r) });
            } catch (err) {
              errors.push(`dom${g.domid}: ${(err as Error).message}`);
              break;
            }
          }
        } finally {
          c.close();
        }
      }),
    );
    const vc = await DataClient.connect(victim.port);
    expect(rc(await vc.transmit(tpm2.pcrExtendSha256(16, new Uint8Array(32).fill(9))))).toBe(0);
    await sleep(300);
    const warm = samples.length;
    // Freeze the domain so a command is surely inside it, then kill it.
    process.kill(dead.pid, 'SIGSTOP');
    const inFlight = vc.transmit(tpm2.getRandom(8), 15_000);
    inFlight.catch(() => undefined);
    await sleep(200);
    const tKill = performance.now();
    process.kill(dead.pid, 'SIGKILL');
    const failed = await inFlight;
    expect(failed.toString('hex')).toBe('80010000000a00000101'); // TPM_RC_FAILURE
    // Served again: a fresh TPM (PCR 16 back to zero), started for it by the guest, its NV kept.
    const next = await vc.transmit(tpm2.pcrReadSha256(16), 15_000);
    const restartMs = performance.now() - tKill;
    expect(rc(next)).toBe(0);
    expect(Buffer.from(tpm2.parsePcrRead(next))).toEqual(Buffer.alloc(32));
    expect(rc(await vc.transmit(tpm2.startup()))).toBe(0x100); // TPM_RC_INITIALIZE: already started
    vc.close();
    await sleep(500);
    stop = true;
    await Promise.all(loops);
    const nv = await run('tpm2_nvread', ['0x1500021', '-C', 'o', '-s', '23'], { env: tcti(victim.port) });
    expect(nv.stdout).toBe('served by a stub domain');
    const reborn = await domainOf(victim.vm);
    // Same domid (the guest's device names it), a new process, the same vTPM.
    expect(reborn).toMatchObject({ domid: dead.domid, instance: dead.instance, alive: true });
    expect(reborn.pid).not.toBe(dead.pid);
    expect(errors).toEqual([]);
    const during = samples.slice(warm);
    expect(during.length).toBeGreaterThan(others.length * 5);
    expect(during.filter((s) => s.rc !== 0)).toEqual([]);
    const worst = Math.max(...during.map((s) => s.ms));
    console.log(`stubdom isolation: victim served again after ${restartMs.toFixed(0)} ms; ${during.length} commands on ${others.length} other guests, worst ${worst.toFixed(0)} ms`);
    expect(worst).toBeLessThan(STALL_BOUND_MS);
  });
});

describe('detach', () => {
  it('closes the device through the vTPM domain, then stops the domain and releases its domid', async () => {
    const g = guests[2]!;
    const d = await domainOf(g.vm);
    const t0 = performance.now();
    const out = await vtpm('guest', 'detach', '--run', runDir, '--domid', String(g.domid));
    expect(out.stderr).not.toMatch(/did not close/);
    expect(performance.now() - t0).toBeLessThan(10_000);
    expect(await domainOf(g.vm)).toBeUndefined();
    expect(() => process.kill(d.pid, 0)).toThrow();
    const xs = await connect(join(runDir, 'xenstored.sock'));
    try {
      expect(await xs.isDomainIntroduced(d.domid)).toBe(false);
      expect(await xs.tryRead(`/local/domain/${d.domid}/backend/vtpm/${g.domid}/0/state`)).toBeUndefined();
      expect(await xs.tryRead(`/local/domain/0/backend/vtpm-stubdom/${g.domid}/0/state`)).toBeUndefined();
    } finally {
      await xs.close();
    }
    expect(fs.existsSync(join(runDir, 'xs', `dom${d.domid}.sock`))).toBe(false);
  });
});

describe('kill -9 of dom0\'s backend', () => {
  it('takes its stub domains with it; the restarted backend starts them again under the same domids and the guests are served', async () => {
    const before = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain' && p.alive);
    expect(before).toHaveLength(2);
    const backend = (await status(runDir)).processes.find((p) => p.role === 'backend')!;
    process.kill(backend.pid, 'SIGKILL');
    // Their control pipe closed: each domain stops (state durable) rather than serve without a toolstack.
    const deadline = Date.now() + 10_000;
    while (before.some((d) => isAlive(d.pid)) && Date.now() < deadline) await sleep(50);
    expect(before.filter((d) => isAlive(d.pid))).toEqual([]);
    await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'));
    for (const g of guests.slice(0, 2)) {
      const c = await DataClient.connect(g.port);
      try {
        // The guest reconnects once its domain is back. A v2 command caught on the dead page is answered
        // TPM_RC_FAILURE (the page has no ids to resubmit by); a ring command waits and runs once.
        let r = await c.transmit(tpm2.getRandom(8), 30_000);
        if (g.protocol === 'v2' && rc(r) === 0x101) r = await c.transmit(tpm2.getRandom(8), 30_000);
        expect(rc(r), `dom${g.domid}'s answer`).toBe(0);
      } finally {
        c.close();
      }
      const d = await domainOf(g.vm);
      expect(d).toMatchObject({ domid: before.find((p) => p.vm === g.vm)!.domid, alive: true });
    }
  });
});

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
