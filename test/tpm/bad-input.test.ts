// Hostile bytes: wrong size fields, oversize commands and random garbage get the error a real TPM gives
// and never crash the process; an instance whose state is corrupt is reported, isolated and recreated.
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TpmHost } from '../../src/tpm/host.js';
import type { TpmInstance } from '../../src/tpm/instance.js';
import type { FailureInfo } from '../../src/tpm/instance-types.js';
import * as tpm12 from '../../src/tpm/tpm12-commands.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { readHeader } from '../../src/tpm/wire.js';
import { sizeErrorResponse } from '../../src/tpm/error-response.js';
import { hex, tempStore, unhex } from './helpers.js';

describe('size errors', () => {
  const t = tempStore('bad');
  const host = new TpmHost();
  let t2: TpmInstance;
  let t12: TpmInstance;
  beforeAll(async () => {
    t2 = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    t12 = await host.create({ instance: 2, version: '1.2', store: t.store, startup: 'clear' });
  });
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  // The one error builder (src/tpm/error-response.ts) against libtpms: a 14-byte command claiming 0x20
  // bytes gets libtpms' own size error, for every request tag of both families.
  const wrongSize = (tag: string, ordinal: string): Uint8Array => unhex(`${tag} 00000020 ${ordinal} 0008`);

  it.each(['00c1', '00c2', '00c3'])('TPM 1.2, request tag %s: ours equals libtpms (00c4 ... TPM_BAD_PARAM_SIZE)', async (tag) => {
    const cmd = wrongSize(tag, '00000046'); // TPM_ORD_GetRandom
    const theirs = await t12.execute(cmd);
    expect(hex(theirs)).toBe('00c40000000a00000019');
    expect(hex(sizeErrorResponse(cmd))).toBe(hex(theirs));
  });

  it.each(['8001', '8002'])('TPM 2.0, request tag %s: ours equals libtpms (8001 ... TPM_RC_COMMAND_SIZE)', async (tag) => {
    const cmd = wrongSize(tag, '0000017b'); // TPM2_CC_GetRandom
    const theirs = await t2.execute(cmd);
    expect(hex(theirs)).toBe('80010000000a00000142');
    expect(hex(sizeErrorResponse(cmd))).toBe(hex(theirs));
  });

  it('TPM 2.0: size field larger or smaller than the bytes -> TPM_RC_COMMAND_SIZE (0x142)', async () => {
    // GetRandom(8) claiming 0x20 bytes, and claiming 10.
    expect(hex(await t2.execute(unhex('8001 00000020 0000017b 0008')))).toBe('80010000000a00000142');
    expect(hex(await t2.execute(unhex('8001 0000000a 0000017b 0008')))).toBe('80010000000a00000142');
  });

  it('TPM 2.0: a command larger than the buffer -> TPM_RC_COMMAND_SIZE, whatever its header says', async () => {
    const big = new Uint8Array(t2.bufferSize + 1);
    big.set(unhex('8001'), 0);
    new DataView(big.buffer).setUint32(2, big.length);
    expect(hex(await t2.execute(big))).toBe('80010000000a00000142');
    expect(hex(await t2.execute(new Uint8Array(1 << 20)))).toBe('80010000000a00000142');
  });

  it('TPM 2.0: a truncated header -> TPM_RC_INSUFFICIENT (0x9a), as libtpms answers', async () => {
    expect(hex(await t2.execute(unhex('800100')))).toBe('80010000000a0000009a');
    expect(hex(await t2.execute(new Uint8Array(0)))).toBe('80010000000a0000009a');
  });

  it('TPM 1.2: wrong paramSize, oversize and truncated -> TPM_BAD_PARAM_SIZE (0x19)', async () => {
    const read = tpm12.pcrRead(10);
    read[5] = 20;
    expect(hex(await t12.execute(read))).toBe('00c40000000a00000019');
    expect(hex(await t12.execute(new Uint8Array(t12.bufferSize + 1)))).toBe('00c40000000a00000019');
    expect(hex(await t12.execute(unhex('00c100')))).toBe('00c40000000a00000019');
  });

  it('random bytes and random commands with valid headers never crash an instance', async () => {
    const wellFormed = async (tpm: TpmInstance, bytes: Uint8Array): Promise<void> => {
      const r = await tpm.execute(bytes);
      const h = readHeader(r);
      expect(h).not.toBeNull();
      expect(h!.size).toBe(r.length);
      expect([0x8001, 0x8002, 0x00c4, 0x00c5, 0x00c6]).toContain(h!.tag);
    };
    const headed = (tag: number) =>
      fc.tuple(fc.integer({ min: 0, max: 0x1ff }), fc.uint8Array({ maxLength: 200 })).map(([code, body]) => {
        const c = new Uint8Array(10 + body.length);
        const v = new DataView(c.buffer);
        v.setUint16(0, tag);
        v.setUint32(2, c.length);
        // TPM 2 command codes live at 0x11f..0x19x; 1.2 ordinals at 0..0x1ff.
        v.setUint32(6, tag === 0x00c1 ? code : 0x100 + code);
        c.set(body, 10);
        return c;
      });
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.uint8Array({ maxLength: 300 }), headed(0x8001), headed(0x8002)),
        async (bytes) => wellFormed(t2, bytes),
      ),
      { numRuns: 300 },
    );
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.uint8Array({ maxLength: 300 }), headed(0x00c1)), async (bytes) => wellFormed(t12, bytes)),
      { numRuns: 300 },
    );
    // Both still answer ordinary commands (the fuzz may have changed their state, not broken them).
    expect(readHeader(await t2.execute(tpm2.getRandom(8)))!.tag).toBe(0x8001);
    expect(readHeader(await t12.execute(tpm12.pcrRead(0)))!.tag).toBe(0x00c4);
  });
});

describe('failure mode', () => {
  const t = tempStore('failure');
  const host = new TpmHost();
  afterAll(async () => {
    await host.destroyAll();
    t.cleanup();
  });

  it('corrupt state: power-on reports libtpms failure, the instance is isolated, others run, recreate() restores it', async () => {
    const victim = await host.create({ instance: 1, version: '2.0', store: t.store, startup: 'clear' });
    const bystander = await host.create({ instance: 2, version: '2.0', store: t.store, startup: 'clear' });
    tpm2.expectSuccess(await victim.execute(tpm2.nvDefineSpace(0x01500003, 4)), 'NV_DefineSpace');
    const good = (await t.store.load(1, 'permanent'))!;
    const failures: FailureInfo[] = [];
    victim.on('failure', (f: FailureInfo) => failures.push(f));

    // The durable permanent state gets damaged (bit rot, a bad restore) and the platform resets.
    const bad = good.slice();
    bad[20] = bad[20]! ^ 0xff;
    await t.store.store(1, 'permanent', bad);
    await expect(victim.reset()).rejects.toMatchObject({ code: 'INIT', tpmResult: 0x101 });
    expect(victim.status).toBe('failed');
    expect(failures).toEqual([expect.objectContaining({ instance: 1, reason: 'init', tpmResult: 0x101 })]);
    // Reported, not crashed: commands get TPM_RC_FAILURE, power-on is refused until recreate.
    expect(hex(await victim.execute(tpm2.getRandom(8)))).toBe('80010000000a00000101');
    await expect(victim.powerOn()).rejects.toMatchObject({ code: 'FAILED' });
    // The other instance in the same process is untouched.
    expect(tpm2.parseGetRandom(await bystander.execute(tpm2.getRandom(16)))).toHaveLength(16);
    // The store gets its last good state back (as the manager would from its copy); recreate.
    await t.store.store(1, 'permanent', good);
    await victim.recreate();
    expect(victim.status).toBe('running');
    expect(await victim.startup('clear')).toBe(0);
    const r = await victim.execute(tpm2.nvWrite(0x01500003, new Uint8Array(randomBytes(4))));
    expect(hex(r.subarray(6, 10))).toBe('00000000');
  });
});
