// Spare TPMs (TpmHost option `spares`): manufactured ahead of time, handed out once, each with its own
// seeds, durable under the instance they become before their first response, never used for an
// instance that already has state, and dropped by destroyAll().
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { Limiter } from '../../src/tpm/limiter.js';
import { TpmHost } from '../../src/tpm/host.js';
import { TpmInstance } from '../../src/tpm/instance.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import * as tpm12 from '../../src/tpm/tpm12-commands.js';
import { GatedStore, hex, tempStore } from './helpers.js';

const here = dirname(fileURLToPath(import.meta.url));

/** outPublic of a CreatePrimary response: header 10, handle 4, parameterSize 4, then a TPM2B_PUBLIC. */
function outPublic(rsp: Uint8Array): string {
  tpm2.expectSuccess(rsp, 'CreatePrimary');
  const size = Buffer.from(rsp).readUInt16BE(18);
  return hex(rsp.subarray(20, 20 + size));
}

/** Lines of /proc/self/maps that map the libtpms file: one set per loaded copy. */
function libtpmsMappings(): number {
  return readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => /libtpms\.so/.test(l)).length;
}

describe('spare TPMs', () => {
  const cleanups: Array<() => void> = [];
  const hosts: TpmHost[] = [];
  const newHost = (opts: ConstructorParameters<typeof TpmHost>[0]): TpmHost => {
    const h = new TpmHost(opts);
    hosts.push(h);
    return h;
  };
  const store = (prefix: string): ReturnType<typeof tempStore> => {
    const t = tempStore(prefix);
    cleanups.push(t.cleanup);
    return t;
  };
  // Every test's hosts go before the next test, so no refill of theirs runs into another test's counts.
  afterEach(async () => {
    await Promise.all(hosts.splice(0).map((h) => h.destroyAll()));
  });
  afterAll(() => {
    for (const c of cleanups) c();
  });

  it('a spare is bound once: a second bindSpare() is refused, and the bound TPM is no spare', async () => {
    const t = store('spare-bind');
    const spare = await TpmInstance.manufacture('2.0', new Limiter(2));
    try {
      expect(spare.isSpare).toBe(true);
      expect(spare.instance).toBe(-1);
      spare.bindSpare({ instance: 5, version: '2.0', store: t.store });
      expect(spare.isSpare).toBe(false);
      expect(spare.instance).toBe(5);
      expect(() => spare.bindSpare({ instance: 6, version: '2.0', store: t.store })).toThrow(/not an unbound/);
      expect(spare.instance).toBe(5);
    } finally {
      await spare.destroy();
    }
  });

  it('concurrent creates never share a spare: distinct TPMs, distinct permanent state', async () => {
    const t = store('spare-once');
    const host = newHost({ spares: 3 });
    await host.sparesReady();
    expect(host.spareCount()).toBe(3);
    const made = await Promise.all(
      Array.from({ length: 8 }, (_, i) => host.create({ instance: 20 + i, version: '2.0', store: t.store, startup: 'clear' })),
    );
    // All three ready spares went out (more only if a refill went ahead on a slow machine, after 50 ms).
    expect(made.filter((m) => m.fromSpare).length).toBeGreaterThanOrEqual(3);
    expect(new Set(made).size).toBe(8);
    expect(made.map((m) => m.instance)).toEqual([20, 21, 22, 23, 24, 25, 26, 27]);
    for (const m of made) tpm2.parseGetRandom(await m.execute(tpm2.getRandom(8)));
    const perms = await Promise.all(made.map(async (m) => hex((await t.store.load(m.instance, 'permanent'))!)));
    expect(new Set(perms).size).toBe(8);
    for (const m of made) await host.destroy(m.instance);
  });

  it('two spare-made TPMs have their own seeds: the same primary key template gives different keys', async () => {
    const t = store('spare-seeds');
    const host = newHost({ spares: 2 });
    await host.sparesReady();
    const [a, b] = await Promise.all([
      host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' }),
      host.create({ instance: 2, version: '2.0', store: t.store, startup: 'clear' }),
    ]);
    expect([a.fromSpare, b.fromSpare]).toEqual([true, true]);
    const pa = outPublic(await a.execute(tpm2.createPrimaryRsa(2048)));
    const pb = outPublic(await b.execute(tpm2.createPrimaryRsa(2048)));
    expect(pa).not.toBe(pb);
    // Same TPM, same template: the same key (so a difference above is the seed, not chance).
    expect(outPublic(await a.execute(tpm2.createPrimaryRsa(2048)))).toBe(pa);
  });

  it('a spare that waited looks just powered on: TPM 2.0 time and clock, TPM 1.2 ticks start near 0', async () => {
    const t = store('spare-clock');
    const host = newHost({ spares: { '2.0': 1, '1.2': 1 } });
    await host.sparesReady();
    const waited = 1500;
    await new Promise((r) => setTimeout(r, waited));
    const a = await host.create({ instance: 7, version: '2.0', store: t.store });
    expect(a.fromSpare).toBe(true);
    tpm2.expectSuccess(await a.execute(tpm2.startup()), 'Startup');
    // TPM2_ReadClock: header 10, then TPMS_TIME_INFO: time u64, clock u64, resetCount u32, restartCount u32, safe u8.
    const rc = Buffer.from(await a.execute(Buffer.from('80010000000a00000181', 'hex')));
    tpm2.expectSuccess(rc, 'ReadClock');
    const time = Number(rc.readBigUInt64BE(10));
    const clock = Number(rc.readBigUInt64BE(18));
    expect(time, 'time (ms since power-on)').toBeLessThan(waited / 2);
    expect(clock, 'clock').toBeLessThan(waited / 2);
    // The counters of a TPM manufactured on demand after its first Startup (as swtpm shows).
    const fresh = await host.create({ instance: 8, version: '2.0', store: t.store });
    tpm2.expectSuccess(await fresh.execute(tpm2.startup()), 'Startup');
    const rf = Buffer.from(await fresh.execute(Buffer.from('80010000000a00000181', 'hex')));
    expect([rc.readUInt32BE(26), rc.readUInt32BE(30)]).toEqual([rf.readUInt32BE(26), rf.readUInt32BE(30)]);
    const b = await host.create({ instance: 9, version: '1.2', store: t.store });
    expect(b.fromSpare).toBe(true);
    expect(hex(await b.execute(tpm12.startup())).slice(12)).toBe('00000000');
    // TPM_GetTicks: header 10, TPM_CURRENT_TICKS: tag u16, currentTicks u64 (µs since TPM_Init), ...
    const ticks = Buffer.from(await b.execute(Buffer.from('00c10000000a000000f1', 'hex')));
    expect(ticks.readUInt32BE(6)).toBe(0);
    expect(Number(ticks.readBigUInt64BE(12)) / 1000, 'ticks (ms)').toBeLessThan(waited / 2);
  });

  it("a spare-made TPM's state is durable before its first response is released", async () => {
    const t = store('spare-gate');
    const logged = new GatedStore(t.store);
    const host = newHost({ spares: 1 });
    await host.sparesReady();
    const tpm = await host.create({ instance: 3, version: '2.0', store: logged });
    expect(tpm.fromSpare).toBe(true);
    expect(logged.log).toEqual([]); // nothing of the manufactured TPM was stored or shown yet
    logged.hold();
    let answered = false;
    const p = tpm.execute(tpm2.startup()).then((r) => {
      logged.log.push('answered');
      answered = true;
      return r;
    });
    while (logged.log.length === 0) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    expect(answered).toBe(false);
    logged.release();
    expect(hex(await p)).toBe('80010000000a00000000');
    expect(logged.log).toEqual(['store 3 permanent', 'stored 3 permanent', 'answered']);
  });

  it("create({ startup }) does not wait for its Startup's state write; the first released response does", async () => {
    const t = store('spare-startup');
    const logged = new GatedStore(t.store);
    const host = newHost({ spares: 1 });
    await host.sparesReady();
    logged.hold();
    const tpm = await host.create({ instance: 4, version: '2.0', store: logged, startup: 'clear' });
    expect(tpm.fromSpare).toBe(true);
    while (logged.log.length === 0) await new Promise((r) => setTimeout(r, 5));
    expect(logged.log).toEqual(['store 4 permanent']); // held: create() resolved all the same
    const p = tpm.execute(tpm2.getRandom(8)).then((r) => {
      logged.log.push('answered');
      return r;
    });
    await new Promise((r) => setTimeout(r, 50));
    expect(logged.log).toEqual(['store 4 permanent']);
    logged.release();
    tpm2.parseGetRandom(await p);
    expect(logged.log).toEqual(['store 4 permanent', 'stored 4 permanent', 'answered']);
  });

  it("a failed write of create()'s Startup withholds the first response and fails the instance", async () => {
    const t = store('spare-startup-fail');
    const logged = new GatedStore(t.store);
    const host = newHost({});
    logged.hold();
    const tpm = await host.create({ instance: 5, version: '2.0', store: logged, startup: 'clear' });
    const p = tpm.execute(tpm2.getRandom(8));
    await new Promise((r) => setTimeout(r, 20));
    logged.fail(new Error('disk full'));
    await expect(p).rejects.toMatchObject({ code: 'STORE' });
    expect(tpm.status).toBe('failed');
    expect(readdirSync(t.dir).filter((f) => f.startsWith('tpm-'))).toEqual([]);
  });

  it('killed right after its first response, a spare-made TPM comes back with the same keys', async () => {
    const t = store('spare-kill');
    const child = spawn(process.execPath, [join(here, 'spare-child.mjs'), t.dir, '7'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const [code, signal] = await new Promise<[number | null, string | null]>((r) => child.once('exit', (c, s) => r([c, s])));
    expect({ code, signal, err }).toEqual({ code: null, signal: 'SIGKILL', err: '' });
    const { fromSpare, rsp } = JSON.parse(out) as { fromSpare: boolean; rsp: string };
    expect(fromSpare).toBe(true);
    expect(readdirSync(t.dir).filter((f) => f.startsWith('tpm-7.'))).toEqual(['tpm-7.permanent']);
    const host = newHost({});
    const again = await host.create({ instance: 7, version: '2.0', store: t.store, startup: 'clear' });
    const pub = outPublic(await again.execute(tpm2.createPrimaryRsa(2048)));
    expect(pub).toBe(outPublic(Buffer.from(rsp, 'hex')));
  });

  it('an instance with state in the store never takes a spare', async () => {
    const t = store('spare-existing');
    const cold = newHost({});
    const first = await cold.create({ instance: 9, version: '2.0', store: t.store, startup: 'clear' });
    const pub = outPublic(await first.execute(tpm2.createPrimaryRsa(2048)));
    await cold.destroy(9);

    const host = newHost({ spares: 1 });
    await host.sparesReady();
    const again = await host.create({ instance: 9, version: '2.0', store: t.store, startup: 'clear' });
    expect(again.fromSpare).toBe(false);
    expect(host.spareCount()).toBe(1);
    expect(outPublic(await again.execute(tpm2.createPrimaryRsa(2048)))).toBe(pub);
    await host.destroy(9);

    // powerOn: false never takes a spare (state blobs go in before the first power-on) ...
    const off = await host.create({ instance: 11, version: '2.0', store: t.store, powerOn: false });
    expect(off.status).toBe('off');
    expect(host.spareCount()).toBe(1);
    // ... and any state at all, here only a savestate blob, counts as state.
    await t.store.store(10, 'savestate', Uint8Array.of(1, 2, 3));
    const saved = await host.create({ instance: 10, version: '2.0', store: t.store }).catch(() => null);
    expect(saved?.fromSpare ?? false).toBe(false);
    expect(host.spareCount()).toBe(1);
  });

  it('TPM 1.2 and 2.0 spares are separate', async () => {
    const t = store('spare-versions');
    const host = newHost({ spares: { '1.2': 1 } });
    await host.sparesReady();
    expect([host.spareCount('2.0'), host.spareCount('1.2')]).toEqual([0, 1]);
    const v2 = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    expect(v2.fromSpare).toBe(false);
    expect(host.spareCount('1.2')).toBe(1);
    const v12 = await host.create({ instance: 2, version: '1.2', store: t.store, startup: 'clear' });
    expect(v12.fromSpare).toBe(true);
    expect(v12.version).toBe('1.2');
    const rnd = await v12.execute(tpm12.getRandom(8));
    expect(hex(rnd.subarray(0, 10))).toBe('00c40000001600000000');
    expect(readdirSync(t.dir)).toContain('tpm-2.permanent');
  });

  it('destroyAll() drops the spares, unloads their library copies and makes no more', async () => {
    const before = libtpmsMappings();
    const host = newHost({ spares: 2 });
    await host.sparesReady();
    expect(host.spareCount()).toBe(2);
    const loaded = libtpmsMappings();
    expect(loaded).toBeGreaterThan(before);
    await host.destroyAll();
    expect(host.spareCount()).toBe(0);
    expect(libtpmsMappings()).toBe(before);
    await new Promise((r) => setTimeout(r, 100));
    expect(host.spareCount()).toBe(0);
    expect(libtpmsMappings()).toBe(before);
  });
});
