// State blobs in swtpm's CMD_GET_STATEBLOB format: the exact header/TLV bytes, a round trip into a new
// instance (PCRs, NV index contents, persistent handles survive), and exchange with a real swtpm both ways.
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { SwtpmProcess, type SwtpmStart } from '../helpers/swtpm.js';
import { TpmClient } from '../helpers/tpm-client.js';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import { StateBlobError, decodeStateBlob, encodeStateBlob } from '../../src/tpm/state-blob.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { hex, tempStore, unhex } from './helpers.js';
import { scratchDir } from '../helpers/temp.js';

const NV_INDEX = 0x01500001;
const PERSISTENT = 0x81000001;

describe('state blob encoding', () => {
  it('wraps libtpms bytes in swtpm blobheader v2 + TAG_MIGRATION_DATA + TAG_DATA', () => {
    const blob = encodeStateBlob(unhex('deadbeef'));
    expect(hex(blob)).toBe(
      '02' + '01' + '000a' + '0004' + '0000001a' + // version 2, min 1, hdrsize 10, flags MIGRATION_DATA, totlen 26
        '0004' + '0000000a' + // TAG_MIGRATION_DATA, 10 bytes
        '0001' + '00000004' + 'deadbeef', // TAG_DATA, 4 bytes
    );
    expect(hex(decodeStateBlob(blob)!)).toBe('deadbeef');
  });

  it('reads version-1 blobs (plain bytes after the header) and treats an empty blob as "clear"', () => {
    expect(hex(decodeStateBlob(unhex('01 01 000a 0000 0000000c cafe'))!)).toBe('cafe');
    expect(decodeStateBlob(new Uint8Array(0))).toBeNull();
  });

  it.each([
    ['0201000a', 'SHORT'],
    ['02 01 000a 0004 00000020 0004 00000000', 'TOTLEN'],
    ['02 03 000a 0004 00000010 0004 00000000', 'VERSION'],
    ['02 01 000c 0004 00000010 0004 00000000', 'HDRSIZE'],
    ['02 01 000a 0005 00000010 0004 00000000', 'ENCRYPTED'],
    ['02 01 000a 0006 00000010 0004 00000000', 'ENCRYPTED'],
    ['02 01 000a 0004 00000010 0004 00000000', 'NO_DATA_TAG'],
    ['02 01 000a 0004 00000010 0004 000000ff', 'TLV_OVERRUN'],
  ])('rejects %s with %s', (blob, code) => {
    expect(() => decodeStateBlob(unhex(blob))).toThrow(StateBlobError);
    try {
      decodeStateBlob(unhex(blob));
    } catch (err) {
      expect((err as StateBlobError).code).toBe(code);
    }
  });
});

/** Startup, PCR 16 extend, an NV index with data, a persistent primary key. Returns what to expect. */
async function populate(tpm: TpmInstance): Promise<{ pcr: string; nv: string }> {
  const nvData = new Uint8Array(randomBytes(32));
  await tpm.execute(tpm2.pcrExtendSha256(16, new Uint8Array(randomBytes(32))));
  tpm2.expectSuccess(await tpm.execute(tpm2.nvDefineSpace(NV_INDEX, 32)), 'NV_DefineSpace');
  tpm2.expectSuccess(await tpm.execute(tpm2.nvWrite(NV_INDEX, nvData)), 'NV_Write');
  const handle = tpm2.parseCreatePrimaryHandle(await tpm.execute(tpm2.createPrimaryRsa(2048)));
  tpm2.expectSuccess(await tpm.execute(tpm2.evictControl(handle, PERSISTENT)), 'EvictControl');
  return { pcr: hex(tpm2.parsePcrRead(await tpm.execute(tpm2.pcrReadSha256(16)))), nv: hex(nvData) };
}

describe('state blob round trip between engine instances', () => {
  const a = tempStore('blob-a');
  const b = tempStore('blob-b');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    a.cleanup();
    b.cleanup();
  });

  it('get -> new instance -> set -> same PCRs, NV contents and persistent handles', async () => {
    const src = await host.create({ instance: 1, version: '2.0', store: a.store, startup: 'clear' });
    const want = await populate(src);
    const perm = (await src.getStateBlob('permanent'))!;
    const vol = (await src.getStateBlob('volatile'))!;
    expect(await src.getStateBlob('savestate')).toBeNull(); // TPM 2 keeps no savestate file
    expect(hex(perm.subarray(0, 6))).toBe('0201000a0004');

    const dst = await host.create({ instance: 7, version: '2.0', store: b.store, powerOn: false });
    await dst.setStateBlob('permanent', perm);
    await dst.setStateBlob('volatile', vol);
    await dst.powerOn();
    // Resumed with its volatile state: no Startup needed, PCRs as they were.
    expect(hex(tpm2.parsePcrRead(await dst.execute(tpm2.pcrReadSha256(16))))).toBe(want.pcr);
    expect(hex(tpm2.parseNvRead(await dst.execute(tpm2.nvRead(NV_INDEX, 32))))).toBe(want.nv);
    expect(tpm2.parseHandles(await dst.execute(tpm2.getHandles()))).toContain(PERSISTENT);
    // And it is durable under the new instance number: a restart from b's store has the NV index.
    await dst.powerOff();
    await dst.powerOn();
    expect(await dst.startup('clear')).toBe(0);
    expect(hex(tpm2.parseNvRead(await dst.execute(tpm2.nvRead(NV_INDEX, 32))))).toBe(want.nv);
  });

  it('refuses to set a blob while the TPM runs, and a blob libtpms cannot parse', async () => {
    const src = host.get(1)!;
    const perm = (await src.getStateBlob('permanent'))!;
    await expect(src.setStateBlob('permanent', perm)).rejects.toMatchObject({ code: 'RUNNING' });
    const off = await host.create({ instance: 8, version: '2.0', store: b.store, powerOn: false });
    await expect(off.setStateBlob('permanent', encodeStateBlob(unhex('00112233')))).rejects.toMatchObject({ code: 'LIBTPMS' });
  });
});

describe('state blobs and a real swtpm', () => {
  const host = new TpmHost();
  const cleanups: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  afterAll(() => host.destroyAll());

  it("our permanent/volatile blobs load into swtpm (swtpm_ioctl --load) and it sees our PCRs, NV and handles", async () => {
    const s = tempStore('x-ours');
    cleanups.push(s.cleanup);
    const ours = await host.create({ instance: 1, version: '2.0', store: s.store, startup: 'clear' });
    const want = await populate(ours);
    const d = scratchDir('x-sw');
    cleanups.push(d.cleanup);
    writeFileSync(join(d.dir, 'perm.blob'), (await ours.getStateBlob('permanent'))!);
    writeFileSync(join(d.dir, 'vol.blob'), (await ours.getStateBlob('volatile'))!);
    // As QEMU's migration destination: swtpm waits for INIT, blobs are set first.
    const sw = await SwtpmProcess.start(onSockets(d.dir));
    cleanups.push(() => sw.stop());
    await sw.ioctl('--load', 'permanent', join(d.dir, 'perm.blob'));
    await sw.ioctl('--load', 'volatile', join(d.dir, 'vol.blob'));
    await sw.ioctl('-i');
    const conn = await TpmClient.connect({ path: sw.dataPath! });
    cleanups.push(() => conn.close());
    expect(hex(tpm2.parsePcrRead(await conn.transmit(tpm2.pcrReadSha256(16))))).toBe(want.pcr);
    expect(hex(tpm2.parseNvRead(await conn.transmit(tpm2.nvRead(NV_INDEX, 32))))).toBe(want.nv);
    expect(tpm2.parseHandles(await conn.transmit(tpm2.getHandles()))).toContain(PERSISTENT);
  });

  it("swtpm's blobs (swtpm_ioctl --save) have our exact framing and load into an engine instance", async () => {
    const d = scratchDir('x-sw2');
    cleanups.push(d.cleanup);
    const sw = await SwtpmProcess.start({ ...onSockets(d.dir), flags: 'not-need-init,startup-clear' });
    cleanups.push(() => sw.stop());
    const conn = await TpmClient.connect({ path: sw.dataPath! });
    cleanups.push(() => conn.close());
    await conn.transmit(tpm2.pcrExtendSha256(16, unhex('5a'.repeat(32))));
    const pcr = hex(tpm2.parsePcrRead(await conn.transmit(tpm2.pcrReadSha256(16))));
    await sw.ioctl('--save', 'permanent', join(d.dir, 'perm.blob'));
    await sw.ioctl('--save', 'volatile', join(d.dir, 'vol.blob'));
    const perm = new Uint8Array(readFileSync(join(d.dir, 'perm.blob')));
    const vol = new Uint8Array(readFileSync(join(d.dir, 'vol.blob')));
    // Same header and TLV nesting as encodeStateBlob: re-encoding the payload gives swtpm's bytes back.
    expect(hex(encodeStateBlob(decodeStateBlob(perm)!))).toBe(hex(perm));
    expect(hex(encodeStateBlob(decodeStateBlob(vol)!))).toBe(hex(vol));

    const s = tempStore('x-ours2');
    cleanups.push(s.cleanup);
    const ours = await host.create({ instance: 2, version: '2.0', store: s.store, powerOn: false });
    await ours.setStateBlob('permanent', perm);
    await ours.setStateBlob('volatile', vol);
    await ours.powerOn();
    expect(hex(tpm2.parsePcrRead(await ours.execute(tpm2.pcrReadSha256(16))))).toBe(pcr);
    // Our blob of the same state, taken back out, is the one swtpm gave us (permanent is not rewritten
    // by a resume, so it is byte-identical).
    expect(hex((await ours.getStateBlob('permanent'))!)).toBe(hex(perm));
  });
});

/** swtpm with its control and data sockets in `dir`. */
function onSockets(dir: string): SwtpmStart {
  return { stateDir: dir, transport: 'unix', ctrlPath: join(dir, 'ctrl.sock'), dataPath: join(dir, 'data.sock') };
}
