// Crash isolation in multi-VM mode: kill -9 of one guest's vTPM domain. The backend restarts the domain
// (new domid, new pid) from the manager's last checkpoint; the ring guest's command in flight is sent
// again with its id and answered there (never a hang), and the guest carries on with its NV index; the other guests, each with
// several connections keeping commands queued, see no error and no command slower than STALL_BOUND_MS.
import { afterAll, beforeAll, beforeEach, describe, expect, it, onTestFailed } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePortPair } from '../../../src/cli/ports.js';
import * as tpm2 from '../../../src/tpm/tpm2-commands.js';
import { DataClient, dumpLogs, rc, run, status, tcti, vtpm } from './host.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

/** The stall bound we promise other guests while one vTPM domain dies and restarts. */
const STALL_BOUND_MS = 2000;
const GUESTS = 5;
const CONNS = 4;

const work = tempDir('multivm-iso');
const runDir = join(work, 'run');
const guests: Array<{ domid: number; vm: string; port: number }> = [];

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--mode', 'multi');
  for (let i = 1; i <= GUESTS; i++) {
    const g = { domid: i, vm: randomUUID(), port: await freePortPair() };
    await vtpm('guest', 'attach', '--run', runDir, '--domid', String(i), '--vm', g.vm, '--protocol', i % 2 ? 'ring' : 'v2', '--tcti-port', String(g.port));
    guests.push(g);
  }
});

// A failure under load is only diagnosable from the host's logs, which afterAll deletes.
beforeEach(() => onTestFailed(() => dumpLogs(runDir)));

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('kill -9 of one vTPM domain', () => {
  it('hurts only its guest, restarts it from its checkpoint, answers the command in flight, and leaves the others unstalled', async () => {
    const victim = guests[0]!;
    const others = guests.slice(1);
    for (const g of guests) await run('tpm2_startup', ['-c'], { env: tcti(g.port) });
    // Durable state the restarted domain must come back with.
    fs.writeFileSync(join(work, 'nv.in'), 'survives kill -9');
    await run('tpm2_nvdefine', ['0x1500020', '-C', 'o', '-s', '32', '-a', 'ownerread|ownerwrite'], { env: tcti(victim.port) });
    await run('tpm2_nvwrite', ['0x1500020', '-C', 'o', '-i', join(work, 'nv.in')], { env: tcti(victim.port) });

    const before = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain');
    expect(before).toHaveLength(GUESTS);
    const dead = before.find((p) => p.vm === victim.vm)!;

    // Load on the other guests: CONNS connections each, so commands queue behind each other.
    let stop = false;
    const samples: Array<{ domid: number; ms: number; rc: number }> = [];
    const errors: string[] = [];
    const loops = others.flatMap((g) =>
      Array.from({ length: CONNS }, async () => {
        const c = await DataClient.connect(g.port);
        try {
          while (!stop) {
            const t0 = performance.now();
            try {
              const r = await c.transmit(tpm2.getRandom(16), STALL_BOUND_MS * 5);
              samples.push({ domid: g.domid, ms: performance.now() - t0, rc: rc(r) });
            } catch (err) {
              errors.push(`dom${g.domid}: ${(err as Error).message}`);
            }
          }
        } finally {
          c.close();
        }
      }),
    );
    await sleep(500);
    const warm = samples.length;

    // Freeze the victim's domain so a command is surely in flight inside it, then kill it.
    const vc = await DataClient.connect(victim.port);
    process.kill(dead.pid, 'SIGSTOP');
    const inFlight = vc.transmit(tpm2.getRandom(8), 10_000);
    await sleep(200);
    const tKill = performance.now();
    process.kill(dead.pid, 'SIGKILL');
    // The command in flight is sent again, same ring id, to the restarted domain and answered there.
    const answered = await inFlight;
    const failMs = performance.now() - tKill;
    expect(rc(answered)).toBe(0);
    expect(answered.readUInt16BE(10)).toBe(8);

    // The guest carries on: its next command waits for the restarted domain and succeeds.
    const next = await vc.transmit(tpm2.getRandom(8), 10_000);
    const restartMs = performance.now() - tKill;
    expect(rc(next)).toBe(0);
    expect(next.readUInt16BE(10)).toBe(8);
    vc.close();
    await sleep(1000);
    stop = true;
    await Promise.all(loops);

    const nv = await run('tpm2_nvread', ['0x1500020', '-C', 'o', '-s', '16'], { env: tcti(victim.port) });
    expect(nv.stdout).toBe('survives kill -9');
    // Startup was done for it: a guest-issued Startup is now TPM_RC_INITIALIZE (already started).
    const again = await DataClient.connect(victim.port);
    expect(rc(await again.transmit(tpm2.startup()))).toBe(0x100);
    again.close();

    const after = (await status(runDir)).processes.filter((p) => p.role === 'vtpm-domain');
    expect(after).toHaveLength(GUESTS);
    const reborn = after.find((p) => p.vm === victim.vm)!;
    expect(reborn.alive).toBe(true);
    expect(reborn.pid).not.toBe(dead.pid);
    expect(reborn.domid).not.toBe(dead.domid);
    expect(reborn.instance).toBe(dead.instance);
    for (const p of before.filter((q) => q.vm !== victim.vm)) expect(after).toContainEqual(p);

    // The others: no error, every response a success, none slower than the bound, and they kept going.
    expect(errors).toEqual([]);
    const during = samples.slice(warm);
    expect(during.length).toBeGreaterThan(others.length * CONNS * 5);
    expect(during.filter((s) => s.rc !== 0)).toEqual([]);
    const worst = Math.max(...during.map((s) => s.ms));
    console.log(`multivm isolation: victim answered in ${failMs.toFixed(0)} ms, served again after ${restartMs.toFixed(0)} ms; ` +
      `${during.length} commands on ${others.length} other guests, worst ${worst.toFixed(0)} ms (bound ${STALL_BOUND_MS} ms)`);
    expect(worst).toBeLessThan(STALL_BOUND_MS);
  });
});
