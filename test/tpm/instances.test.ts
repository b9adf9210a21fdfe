// Many instances in one process are independent TPMs (each its own libtpms copy), and one instance's
// long command does not hold up another's.
import { createHash, randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { isFastCommand } from '../../src/tpm/fast-path.js';
import { GatedStore, hex, tempStore, unhex } from './helpers.js';

describe('200 instances in one process', () => {
  const t = tempStore('many');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('each keeps its own PCRs and its own permanent state', async () => {
    const n = 200;
    const tpms: TpmInstance[] = [];
    for (let i = 0; i < n; i++) tpms.push(await host.create({ instance: i, version: '2.0', store: t.store, startup: 'clear' }));
    expect(host.list()).toHaveLength(n);
    // A different digest into PCR 16 of every instance, concurrently.
    const digests = tpms.map(() => new Uint8Array(randomBytes(32)));
    await Promise.all(tpms.map((tpm, i) => tpm.execute(tpm2.pcrExtendSha256(16, digests[i]!))));
    const reads = await Promise.all(tpms.map((tpm) => tpm.execute(tpm2.pcrReadSha256(16))));
    reads.forEach((r, i) => {
      const expected = createHash('sha256').update(new Uint8Array(32)).update(digests[i]!).digest();
      expect(hex(tpm2.parsePcrRead(r))).toBe(expected.toString('hex'));
    });
    // Every instance manufactured its own TPM: 200 different permanent states (own seeds).
    const perms = await Promise.all(tpms.map((tpm) => tpm.getStateBlob('permanent')));
    expect(new Set(perms.map((p) => hex(p!))).size).toBe(n);
  });
});

describe('a long command on one instance', () => {
  const t = tempStore('keygen');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('does not hold up GetRandom on another instance (RSA-3072 CreatePrimary vs GetRandom)', async () => {
    const a = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    const b = await host.create({ instance: 2, version: '2.0', store: t.store, startup: 'clear' });
    let keygenDone = false;
    const keygen = a.execute(tpm2.createPrimaryRsa(3072, randomBytes(16))).then((r) => {
      keygenDone = true;
      return r;
    });
    const latencies: number[] = [];
    let duringKeygen = 0;
    while (!keygenDone || latencies.length < 3) {
      const s = performance.now();
      const r = await b.execute(tpm2.getRandom(16));
      latencies.push(performance.now() - s);
      if (!keygenDone) duringKeygen++;
      expect(tpm2.parseGetRandom(r)).toHaveLength(16);
    }
    const handle = tpm2.parseCreatePrimaryHandle(await keygen);
    expect(handle >>> 24).toBe(0x80); // a transient object
    // GetRandoms kept completing while the key was being generated, none waited for it.
    expect(duringKeygen).toBeGreaterThanOrEqual(3);
    expect(Math.max(...latencies)).toBeLessThan(200);
  });

  it('cancel() stops a running key generation with TPM_RC_CANCELED', async () => {
    const a = host.get(1)!;
    const p = a.execute(tpm2.createPrimaryRsa(3072, randomBytes(16)));
    while (!a.busy) await new Promise((r) => setTimeout(r, 1));
    a.cancel();
    expect(hex(await p)).toBe('80010000000a00000909');
    // The instance keeps working afterwards.
    expect(tpm2.parseGetRandom(await a.execute(tpm2.getRandom(8)))).toHaveLength(8);
  });
});

describe("host option inline: 'fast'", () => {
  const t = tempStore('inline');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('only constant-time commands qualify', () => {
    expect(isFastCommand('2.0', tpm2.getRandom(64))).toBe(true);
    expect(isFastCommand('2.0', tpm2.getRandom(65))).toBe(false);
    expect(isFastCommand('2.0', tpm2.pcrExtendSha256(16, new Uint8Array(32)))).toBe(true);
    expect(isFastCommand('2.0', tpm2.createPrimaryRsa(2048))).toBe(false);
    expect(isFastCommand('2.0', unhex('8001 00000020 0000017b 0008'))).toBe(false); // lying size
    expect(isFastCommand('1.2', unhex('00c1 0000000e 00000015 0000000a'))).toBe(true); // TPM_PCRRead
  });

  it('answers like the pool path and still is not held up by a key generation elsewhere', async () => {
    const a = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    const b = await host.create({ instance: 2, version: '2.0', store: t.store, startup: 'clear', inline: 'fast' });
    const d = new Uint8Array(randomBytes(32));
    await b.execute(tpm2.pcrExtendSha256(16, d));
    const expected = createHash('sha256').update(new Uint8Array(32)).update(d).digest('hex');
    expect(hex(tpm2.parsePcrRead(await b.execute(tpm2.pcrReadSha256(16))))).toBe(expected);
    let done = false;
    const keygen = a.execute(tpm2.createPrimaryRsa(3072, randomBytes(16))).then(() => (done = true));
    const latencies: number[] = [];
    while (!done || latencies.length < 3) {
      const s = performance.now();
      await b.execute(tpm2.getRandom(16));
      latencies.push(performance.now() - s);
      await new Promise((r) => setImmediate(r));
    }
    await keygen;
    expect(Math.max(...latencies)).toBeLessThan(200);
  });

  it('executeNow answers a fast command in the same tick, and runs nothing while a state write is not durable or the queue holds work', async () => {
    const gated = new GatedStore(t.store);
    const c = await host.create({ instance: 3, version: '2.0', store: gated, inline: 'fast' });
    // Startup's NV write goes to the store and waits there: nothing may be answered before it is durable.
    gated.hold();
    expect(await c.startupUnreleased('clear')).toBe(0);
    const d = new Uint8Array(randomBytes(32));
    expect(c.executeNow(tpm2.pcrExtendSha256(16, d), 0)).toBeNull();
    // The queued path waits for the same write; meanwhile the queue holds work, so still nothing runs now.
    const queued = c.execute(tpm2.pcrReadSha256(16));
    expect(c.executeNow(tpm2.pcrExtendSha256(16, d), 0)).toBeNull();
    gated.release();
    expect(hex(tpm2.parsePcrRead(await queued))).toBe('00'.repeat(32));
    await new Promise((r) => setImmediate(r));
    // Idle and durable: the extend runs at once and its answer is a plain value (no promise).
    const now = c.executeNow(tpm2.pcrExtendSha256(16, d), 0);
    expect(now).toBeInstanceOf(Uint8Array);
    expect(hex((now as Uint8Array).subarray(6, 10))).toBe('00000000');
    // Not a fast command: never run in line.
    expect(c.executeNow(tpm2.createPrimaryRsa(2048), 0)).toBeNull();
    const expected = createHash('sha256').update(new Uint8Array(32)).update(d).digest('hex');
    expect(hex(tpm2.parsePcrRead(await c.execute(tpm2.pcrReadSha256(16))))).toBe(expected);
  });
});
