// The durability contract: a response is released only after every NV write it caused has been stored;
// a failing store withholds the response and isolates the instance; instances start from the store;
// state blobs set while off are durable once power-on resolves.
import { readdirSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import type { FailureInfo } from '../../src/tpm/instance-types.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { decodeStateBlob } from '../../src/tpm/state-blob.js';
import { GatedStore, hex, tempStore, unhex } from './helpers.js';

const NV_INDEX = 0x01500002;

describe('durability', () => {
  const t = tempStore('durable');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('a command that writes NV is answered only after store() resolved', async () => {
    const gated = new GatedStore(t.store);
    const tpm = await host.create({ instance: 1, version: '2.0', store: gated, startup: 'clear' });
    gated.stores = [];
    gated.hold();
    let answered = false;
    const p = tpm.execute(tpm2.nvDefineSpace(NV_INDEX, 8)).then((r) => {
      answered = true;
      return r;
    });
    // libtpms has run the command and asked to store permall; the store has not acknowledged.
    while (gated.stores.length === 0) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 100));
    expect(answered).toBe(false);
    expect(gated.stores[0]).toMatchObject({ instance: 1, kind: 'permanent' });
    gated.release();
    expect(hex(await p)).toBe('80020000001300000000000000000000010000');
    expect(answered).toBe(true);
    // What was acknowledged is on disk: a new instance on the same directory sees the NV index.
    await host.destroy(1);
    const again = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    tpm2.expectSuccess(await again.execute(tpm2.nvWrite(NV_INDEX, unhex('0102030405060708'))), 'NV_Write');
    expect(hex(tpm2.parseNvRead(await again.execute(tpm2.nvRead(NV_INDEX, 8))))).toBe('0102030405060708');
    await host.destroy(1);
  });

  it('a failed store() withholds the response and isolates the instance until recreate()', async () => {
    const gated = new GatedStore(t.store);
    const tpm = await host.create({ instance: 2, version: '2.0', store: gated, startup: 'clear' });
    const failures: FailureInfo[] = [];
    tpm.on('failure', (f: FailureInfo) => failures.push(f));
    gated.stores = [];
    gated.hold();
    const p = tpm.execute(tpm2.nvDefineSpace(NV_INDEX, 8));
    while (gated.stores.length === 0) await new Promise((r) => setTimeout(r, 5));
    gated.fail(new Error('disk full'));
    await expect(p).rejects.toMatchObject({ code: 'STORE' });
    expect(tpm.status).toBe('failed');
    expect(failures).toEqual([expect.objectContaining({ instance: 2, reason: 'store' })]);
    // Isolated: answered with TPM_RC_FAILURE without entering libtpms.
    expect(hex(await tpm.execute(tpm2.getRandom(8)))).toBe('80010000000a00000101');
    // Recreated from the last durable state, which does not have the index.
    gated.hold();
    gated.release();
    await tpm.recreate();
    expect(tpm.status).toBe('running');
    expect(await tpm.startup('clear')).toBe(0);
    const r = await tpm.execute(tpm2.nvRead(NV_INDEX, 8));
    expect(hex(r.subarray(6, 10))).toBe('0000028b'); // TPM_RC_HANDLE + TPM_RC_2: the index does not exist
  });

  it('saveVolatile() stores the volatile state; the next power-on resumes it once', async () => {
    const tpm = await host.create({ instance: 3, version: '2.0', store: t.store, startup: 'clear' });
    await tpm.execute(tpm2.pcrExtendSha256(16, unhex('77'.repeat(32))));
    const pcr = hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(16))));
    await tpm.saveVolatile();
    expect(readdirSync(t.dir)).toContain('tpm-3.volatile');
    await tpm.powerOff();
    await tpm.powerOn();
    expect(hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(16))))).toBe(pcr);
    expect(readdirSync(t.dir)).not.toContain('tpm-3.volatile');
    await tpm.reset();
    expect(await tpm.startup('clear')).toBe(0);
    expect(hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(16))))).toBe('00'.repeat(32));
  });
  it('blobs set while off reach the store together at power-on, durable before it resolves', async () => {
    const src = await host.create({ instance: 4, version: '2.0', store: t.store, startup: 'clear' });
    await src.execute(tpm2.pcrExtendSha256(16, unhex('55'.repeat(32))));
    const pcr = hex(tpm2.parsePcrRead(await src.execute(tpm2.pcrReadSha256(16))));
    const perm = (await src.getStateBlob('permanent'))!;
    const vol = (await src.getStateBlob('volatile'))!;
    await host.destroy(4);

    const gated = new GatedStore(t.store);
    const dst = await host.create({ instance: 5, version: '2.0', store: gated, powerOn: false });
    await dst.setStateBlob('permanent', perm);
    await dst.setStateBlob('volatile', vol);
    // Nothing runs on them yet, so nothing is written yet (QEMU's post_load: one commit, not two).
    expect(gated.stores).toEqual([]);
    gated.hold();
    let on = false;
    const p = dst.powerOn().then(() => (on = true));
    // Both in flight at once: the store may commit them as one batch.
    while (gated.stores.length < 2) await new Promise((r) => setTimeout(r, 5));
    expect(gated.stores.map((s) => s.kind).sort()).toEqual(['permanent', 'volatile']);
    await new Promise((r) => setTimeout(r, 50));
    expect(on).toBe(false);
    gated.release();
    await p;
    // Durable when power-on resolved: the store holds exactly the blobs that were set.
    expect(hex((await t.store.load(5, 'permanent'))!)).toBe(hex(decodeStateBlob(perm)!));
    expect(hex((await t.store.load(5, 'volatile'))!)).toBe(hex(decodeStateBlob(vol)!));
    expect(hex(tpm2.parsePcrRead(await dst.execute(tpm2.pcrReadSha256(16))))).toBe(pcr);
    await host.destroy(5);
  });

  it('a restore after the first power-on reads nothing back: libtpms starts while its one commit is still held', async () => {
    const src = await host.create({ instance: 7, version: '2.0', store: t.store, startup: 'clear' });
    await src.execute(tpm2.pcrExtendSha256(16, unhex('66'.repeat(32))));
    const pcr = hex(tpm2.parsePcrRead(await src.execute(tpm2.pcrReadSha256(16))));
    const perm = (await src.getStateBlob('permanent'))!;
    const vol = (await src.getStateBlob('volatile'))!;
    await host.destroy(7);

    const gated = new GatedStore(t.store);
    const loads: string[] = [];
    const load = gated.load.bind(gated);
    gated.load = (i, kind) => (loads.push(kind), load(i, kind));
    const dst = await host.create({ instance: 8, version: '2.0', store: gated, powerOn: false });
    await dst.powerOn(); // QEMU's first INIT: what the store holds is read once
    expect(loads.length).toBeGreaterThan(0);
    await dst.powerOff();
    await dst.setStateBlob('permanent', perm);
    await dst.setStateBlob('volatile', vol);
    loads.length = 0;
    gated.hold();
    let on = false;
    const p = dst.powerOn().then(() => (on = true));
    while (gated.stores.filter((s) => s.instance === 8).length < 2) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    // No store round trip sits before TPMLIB_MainInit, and the restore is still not durable.
    expect(loads).toEqual([]);
    expect(on).toBe(false);
    gated.release();
    await p;
    expect(hex((await t.store.load(8, 'permanent'))!)).toBe(hex(decodeStateBlob(perm)!));
    expect(hex(tpm2.parsePcrRead(await dst.execute(tpm2.pcrReadSha256(16))))).toBe(pcr);
    await host.destroy(8);
  });

  it('what power-on left pending (the consumed volatile state) is made durable by destroy, even while off', async () => {
    const tpm = await host.create({ instance: 6, version: '2.0', store: t.store, startup: 'clear' });
    await tpm.saveVolatile();
    expect(readdirSync(t.dir)).toContain('tpm-6.volatile');
    await tpm.powerOff();
    await tpm.powerOn(); // consumes it: its removal is pending, promised to nobody yet
    await tpm.powerOff();
    await host.destroy(6);
    expect(readdirSync(t.dir)).not.toContain('tpm-6.volatile');
  });
});
