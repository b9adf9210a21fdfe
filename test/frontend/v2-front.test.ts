// The v2 frontend's own bounds, with no backend answering: a command past its duration is cancelled
// (state CANCEL on the page) and fails with ETIME; a device that never goes idle again fails the next
// command after the idle bound; a command the 4088-byte page cannot carry is answered with the size
// error a TPM gives, without touching the page.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freshXenDir } from '../helpers/child.js';
import { Domain } from '../../src/xen/index.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { TPMIF_STATE_CANCEL, TPMIF_STATE_IDLE, V2_STATE } from '../../src/xen/tpmif.js';
import { removeDir } from '../helpers/temp.js';

const dir = freshXenDir();
let fe: Domain;
let be: Domain;

beforeAll(async () => {
  fe = await Domain.create({ domid: 5, dir });
  be = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await fe.destroy();
  await be.destroy();
  removeDir(dir);
});

const getRandom = tpm2.getRandom(8);

describe('V2Front bounds every wait', () => {
  it('a command nobody answers is cancelled after its duration (ETIME, CANCEL on the page); the next fails after the idle bound', async () => {
    const f = new V2Front(fe, 0, { pollUs: 0, commandTimeoutMs: 300 });
    const t0 = Date.now();
    await expect(f.transmit(getRandom)).rejects.toMatchObject({ code: 'ETIME' });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(f.sharedPage[V2_STATE]).toBe(TPMIF_STATE_CANCEL);
    // The backend never went IDLE: the next command does not wait for it forever.
    await expect(f.transmit(getRandom)).rejects.toMatchObject({ code: 'ETIME' });
    // A backend that honours the cancel (IDLE) lets the next command through to the page again.
    Atomics.store(f.sharedPage, V2_STATE, TPMIF_STATE_IDLE);
    await expect(f.transmit(getRandom)).rejects.toThrow(/no answer within 300 ms/);
    await f.close();
  });

  it('commands beyond 4088 bytes are answered like a TPM (2.0: 0x142; 1.2: TPM_BAD_PARAM_SIZE) and never reach the page', async () => {
    const f = new V2Front(fe, 0, { pollUs: 0, commandTimeoutMs: 300 });
    const big2 = Buffer.alloc(4089);
    big2.writeUInt16BE(0x8001, 0);
    big2.writeUInt32BE(4089, 2);
    big2.writeUInt32BE(0x17b, 6);
    expect(Buffer.from(await f.transmit(big2)).toString('hex')).toBe('80010000000a00000142');
    const big12 = Buffer.alloc(4096);
    big12.writeUInt16BE(0x00c1, 0);
    big12.writeUInt32BE(4096, 2);
    big12.writeUInt32BE(0x46, 6);
    // 1.2 answers with the request tag + 3 (0x00c4) and TPM_BAD_PARAM_SIZE (0x19).
    expect(Buffer.from(await f.transmit(big12)).toString('hex')).toBe('00c40000000a00000019');
    expect(f.sharedPage[V2_STATE]).toBe(TPMIF_STATE_IDLE);
    await f.close();
  });
});
