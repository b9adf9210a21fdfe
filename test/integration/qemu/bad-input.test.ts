// Hostile control and data clients against a live endpoint: truncated messages, absurd blob lengths,
// SET_DATAFD twice or without a descriptor, a data command larger than the buffer, and fuzzed byte
// streams. Each gets swtpm's error code on that connection only; the endpoint keeps serving.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import { Cmd, MAX_STATE_BLOB, encodeRequest } from '../../../src/swtpm/codes.js';
import { CtrlReceiver } from '../../../src/swtpm/ctrl-receiver.js';
import { CtrlClient, DataClient, TPM2, TestHost } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qbad');
const ctrl = join(work, 'ctrl.sock');
let host: TestHost;

beforeAll(async () => {
  host = await TestHost.up(work);
  await host.attach(randomUUID(), ctrl);
});

afterAll(async () => {
  await host?.down();
  removeDir(work);
});

async function alive(): Promise<void> {
  const c = await CtrlClient.connect(ctrl);
  expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
  c.close();
}

describe('control receiver (unit)', () => {
  it('yields the same requests however the stream is cut, and never throws on random bytes', () => {
    const requests = [
      encodeRequest(Cmd.INIT, Buffer.from('00000001', 'hex')),
      encodeRequest(Cmd.GET_STATEBLOB, Buffer.from('000000010000000200000000', 'hex')),
      encodeRequest(Cmd.SET_STATEBLOB, Buffer.concat([Buffer.from('0000000000000001000000ff', 'hex'), Buffer.alloc(255, 7)])),
    ];
    // (SET_LOCALITY/RESET_TPMESTABLISHED take "at least 1 byte": like swtpm, their size is whatever the
    // first message carried, so only those exact-size requests are cut at random here.)
    fc.assert(
      fc.property(fc.constantFrom(...requests), fc.array(fc.integer({ min: 1, max: 300 }), { maxLength: 8 }), (req, cuts) => {
        const rx = new CtrlReceiver();
        const evs = [];
        let off = 0;
        for (const c of cuts) {
          if (off >= req.length) break;
          evs.push(...rx.push(req.subarray(off, off + c)));
          off += c;
        }
        if (off < req.length) evs.push(...rx.push(req.subarray(off)));
        expect(evs).toHaveLength(1);
        const ev = evs[0]!;
        expect(ev.kind).toBe('request');
        if (ev.kind === 'request') {
          expect(ev.req.cmd).toBe(req.readUInt32BE(0));
          const body = ev.req.blob ? Buffer.concat([ev.req.payload, ev.req.blob]) : ev.req.payload;
          expect(body.equals(req.subarray(4))).toBe(true);
        }
        expect(rx.pending).toBe(false);
      }),
      { numRuns: 500 },
    );
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 6 }), (chunks) => {
        const rx = new CtrlReceiver();
        for (const c of chunks) rx.push(c);
        rx.expire();
        expect(rx.pending).toBe(false);
      }),
      { numRuns: 2000 },
    );
  });

  it('refuses a blob length above the limit before allocating it', () => {
    const rx = new CtrlReceiver();
    const [ev] = rx.push(Buffer.from('0000000d 00000000 00000001 fffffff0'.replace(/\s/g, ''), 'hex'));
    expect(ev?.kind).toBe('error');
    if (ev?.kind === 'error') {
      expect(ev.err.code).toBe('BLOB_TOO_LARGE');
      expect(ev.err.result).toBe(0x09);
      expect(ev.err.fatal).toBe(true);
    }
    expect(MAX_STATE_BLOB).toBe(512 * 1024);
  });
});

describe('bad input on a live endpoint', () => {
  it('hangs up on a message still incomplete after 500 ms, as swtpm 0.7.1 does; other clients go on', async () => {
    const other = await CtrlClient.connect(ctrl);
    // INIT with 2 of 4 payload bytes; half a command code; GET_STATEBLOB with 8 of 12; a blob 10 of 100.
    for (const msg of ['00000002 0000', '0000', '0000000c 00000001 00000001', `0000000d 00000000 00000001 00000064 ${'00'.repeat(10)}`]) {
      const c = await CtrlClient.connect(ctrl);
      const t0 = Date.now();
      c.write(msg);
      expect((await c.read(4, 3000)).length).toBe(0);
      expect(c.closed).toBe(true);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(450);
      expect(await other.cmd('00000001', 8)).toBe('0000000000007fef');
    }
    // A message completed within the deadline is fine, however it is cut.
    const c = await CtrlClient.connect(ctrl);
    c.write('000000');
    await sleep(100);
    expect(await c.cmd('01', 8)).toBe('0000000000007fef');
    // Extra bytes after INIT or a payload-less command: TPM_BAD_PARAMETER, connection kept.
    expect(await c.cmd('00000002 00000000 00', 4)).toBe('00000003');
    expect(await c.cmd('00000001 00', 4)).toBe('00000003');
    expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
    c.close();
    other.close();
  });

  it('refuses an absurd SET_STATEBLOB length with TPM_FAIL and closes only that connection', async () => {
    const other = await CtrlClient.connect(ctrl);
    const c = await CtrlClient.connect(ctrl);
    expect(await c.cmd('0000000d 00000000 00000001 ffffffff', 4)).toBe('00000009');
    await c.read(1, 1000);
    expect(c.closed).toBe(true);
    expect(await other.cmd('00000001', 8)).toBe('0000000000007fef');
    other.close();
  });

  it('refuses a malformed state blob with swtpm codes, and SET_STATEBLOB while running with 0x0A', async () => {
    const c = await CtrlClient.connect(ctrl);
    expect(await c.cmd('0000000e', 4)).toBe('00000000'); // STOP
    // totlen says 99 but 16 bytes came: TPM_BAD_PARAMETER (swtpm 0.7.1, see differential.test.ts).
    expect(await c.cmd('0000000d 00000000 00000001 00000010 0201000a000400000063 000000000000', 4)).toBe('00000003');
    // hdrsize 12: TPM_BAD_DATASIZE.
    expect(await c.cmd('0000000d 00000000 00000001 00000010 0201000c000400000010 000000000000', 4)).toBe('0000002b');
    // min_version 3: TPM_BAD_VERSION.
    expect(await c.cmd('0000000d 00000000 00000001 00000010 0203000a000400000010 000000000000', 4)).toBe('0000002e');
    // Encrypted with a key we do not have: state_flags ENCRYPTED → TPM_FAIL; a migration-key blob → TPM_KEYNOTFOUND.
    expect(await c.cmd('0000000d 00000002 00000001 00000004 00000000', 4)).toBe('00000009');
    expect(await c.cmd('0000000d 00000000 00000001 00000010 0201000a000600000010 000000000000', 4)).toBe('0000000d');
    // Unknown blob type: TPM_BAD_PARAMETER; GET of one: TPM_RETRY with the 16-byte header (as swtpm 0.7.1).
    expect(await c.cmd('0000000d 00000000 00000009 00000000', 4)).toBe('00000003');
    expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // INIT
    expect(await c.cmd('0000000c 00000001 00000009 00000000', 16)).toBe('00000800' + '0'.repeat(24));
    expect(await c.cmd('0000000d 00000000 00000001 00000004 00000000', 4)).toBe('0000000a');
    c.close();
  });

  it('SET_DATAFD: without a descriptor 0x03, twice 0x1F; an oversized data command gets the size error and the channel goes on', async () => {
    const c = await CtrlClient.connect(ctrl);
    expect(await c.cmd('00000010', 4)).toBe('00000003');
    const [mine, theirs] = socketPair();
    sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]);
    closeFd(theirs);
    expect((await c.read(4)).toString('hex')).toBe('00000000');
    const [m2, t2] = socketPair();
    sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [t2]);
    closeFd(t2);
    closeFd(m2);
    expect((await c.read(4)).toString('hex')).toBe('0000001f');
    expect(await c.cmd('00000002 00000000', 4)).toBe('00000000');
    const data = new DataClient(mine);
    expect(await data.transmit(TPM2.startupClear)).toBe('80010000000a00000000');
    // A 5000-byte command (buffer 4096): TPM_RC_COMMAND_SIZE, the body skipped, the next one served.
    const big = Buffer.alloc(5000);
    Buffer.from('8001000013880000017b', 'hex').copy(big);
    data.sock.write(big.subarray(0, 2000));
    await sleep(20);
    expect(await data.transmit(big.subarray(2000).toString('hex'))).toBe('80010000000a00000142');
    expect(await data.transmit('8001 0000000c 0000017b 0008')).toMatch(/^800100000014000000000008[0-9a-f]{16}$/);
    // A header claiming fewer than 10 bytes.
    expect(await data.transmit('8001 00000004 0000017b')).toBe('80010000000a00000142');
    expect(await data.transmit('8001 0000000c 0000017b 0008')).toMatch(/^800100000014000000000008/);
    data.close();
    c.close();
    await sleep(100);
    // The channel is gone with its socket: a new SET_DATAFD is accepted.
    const c2 = await CtrlClient.connect(ctrl);
    const [m3, t3] = socketPair();
    sendWithFds(c2.fd, Buffer.from('00000010', 'hex'), [t3]);
    closeFd(t3);
    expect((await c2.read(4)).toString('hex')).toBe('00000000');
    closeFd(m3);
    c2.close();
  });

  it('leaks no descriptors: hung-up, refused and normal connections and refused data fds are all closed', async () => {
    const host_ = JSON.parse(fs.readFileSync(join(host.run, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
    const pid = host_.processes.find((p) => p.role === 'backend')!.pid;
    const fds = () => fs.readdirSync(`/proc/${pid}/fd`).length;
    await alive();
    await sleep(200);
    const before = fds();
    for (let i = 0; i < 10; i++) {
      const a = await CtrlClient.connect(ctrl);
      expect(await a.cmd('0000000d 00000000 00000001 ffffffff', 4)).toBe('00000009');
      const b = await CtrlClient.connect(ctrl);
      b.write('0000');
      const c = await CtrlClient.connect(ctrl);
      expect(await c.cmd('00000001', 8)).toBe('0000000000007fef');
      // SET_DATAFD with two fds (refused: 0x03) and an fd riding on another command (closed).
      const [m1, t1] = socketPair();
      const [m2, t2] = socketPair();
      sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [t1, t2]);
      expect((await c.read(4)).toString('hex')).toBe('00000003');
      sendWithFds(c.fd, Buffer.from('00000001', 'hex'), [t1]);
      expect((await c.read(8)).toString('hex')).toBe('0000000000007fef');
      for (const fd of [m1, t1, m2, t2]) closeFd(fd);
      a.close();
      c.close();
      await b.read(4, 1000);
      b.close();
    }
    await sleep(300);
    expect(fds()).toBeLessThanOrEqual(before);
  });

  it('survives fuzzed control streams: answers start with a ptm_res code, the endpoint keeps serving', async () => {
    const known = fc.constantFrom(...Array.from({ length: 0x14 }, (_, i) => i), 0xffff, 0x80000001);
    const msg = fc.tuple(known, fc.uint8Array({ maxLength: 40 })).map(([code, tail]) => Buffer.concat([encodeRequest(code), tail]));
    await fc.assert(
      fc.asyncProperty(fc.array(msg, { minLength: 1, maxLength: 4 }), async (msgs) => {
        const c = await CtrlClient.connect(ctrl);
        for (const m of msgs) {
          // SHUTDOWN/STOP/INIT are legal and only change the TPM's power; SET_DATAFD without fd is refused.
          c.write(m);
          await sleep(2);
        }
        const got = await c.read(1 << 20, 60);
        c.close();
        if (got.length > 0) expect([0x00, 0x03, 0x09, 0x0a, 0x0d, 0x1f, 0x2b, 0x2e, 0x3d, 0x800]).toContain(got.readUInt32BE(0));
        await alive();
      }),
      { numRuns: 60 },
    );
  });
});
