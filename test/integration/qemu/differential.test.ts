// Differential: the same control byte sequences sent to swtpm 0.7.1 (started as for QEMU: --ctrl
// unixio, no flags, so it waits for CMD_INIT) and to our endpoint; every reply must be byte-identical,
// errors included. Only GET_CAPABILITY differs by design (0xFFFF vs our 0x7FEF), and blob payloads
// (random seeds) are compared by header only.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CtrlClient, TestHost } from './helpers.js';
import { SwtpmProcess } from '../../helpers/swtpm.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qdiff');
let host: TestHost;
let swtpm: SwtpmProcess;
const ours = join(work, 'ours.sock');
const peer = join(work, 'swtpm.sock');

beforeAll(async () => {
  swtpm = await startSwtpm();
  host = await TestHost.up(work);
  await host.attach(randomUUID(), ours);
});

afterAll(async () => {
  await swtpm?.stop();
  await host?.down();
  removeDir(work);
});

/** swtpm exits on CMD_SHUTDOWN: a fresh one (same state dir) for the next test. */
async function restartSwtpm(): Promise<void> {
  await swtpm.stop();
  fs.rmSync(peer, { force: true });
  swtpm = await startSwtpm();
}

function startSwtpm(): Promise<SwtpmProcess> {
  return SwtpmProcess.start({ stateDir: join(work, 'swtpm'), transport: 'unix', ctrlPath: peer });
}

/** Send one message, collect everything that arrives until 150 ms of silence. */
async function exchange(c: CtrlClient, hex: string): Promise<string> {
  c.write(hex);
  let out = await c.read(1, 3000);
  for (;;) {
    const b = await c.read(1 << 20, 150);
    if (b.length === 0) break;
    out = Buffer.concat([out, b]);
  }
  return out.toString('hex');
}

const blob = (hdr: string, body = '') => {
  const b = Buffer.from((hdr + body).replace(/\s/g, ''), 'hex');
  return `${b.length.toString(16).padStart(8, '0')} ${b.toString('hex')}`;
};

// [label, message]; one message per write, each answered before the next.
const SEQUENCE: Array<[string, string]> = [
  ['GET_TPMESTABLISHED before INIT', '00000004'],
  ['CANCEL before INIT', '00000009'],
  ['STORE_VOLATILE before INIT', '0000000a'],
  ['RESET_TPMESTABLISHED before INIT', '0000000b 00000000'],
  ['GET_STATEBLOB before INIT', '0000000c 00000001 00000001 00000000'],
  ['SET_LOCALITY 0', '00000005 00000000'],
  ['SET_LOCALITY 5', '00000005 05000000'],
  ['GET_CONFIG', '0000000f'],
  ['SET_BUFFERSIZE query', '00000011 00000000'],
  ['SET_BUFFERSIZE 100 (clamped up)', '00000011 00000064'],
  ['SET_BUFFERSIZE 99999 (clamped down)', '00000011 0001869f'],
  ['SET_BUFFERSIZE 4096', '00000011 00001000'],
  ['GET_INFO spec', '00000012 0000000000000001 00000000 00000000'],
  ['GET_INFO offset past end', '00000012 0000000000000001 00001000 00000000'],
  ['unknown 0xFFFF', '0000ffff'],
  ['unknown 0x13 LOCK_STORAGE (0.7.1 has none)', '00000013 00000001'],
  ['SET_STATEBLOB unknown type', '0000000d 00000000 00000009 00000000'],
  ['SET_STATEBLOB bad totlen', `0000000d 00000000 00000001 ${blob('0201000a00040000ffff', '000000000000')}`],
  ['SET_STATEBLOB hdrsize 12', `0000000d 00000000 00000001 ${blob('0201000c000400000010', '000000000000')}`],
  ['SET_STATEBLOB 4 bytes', `0000000d 00000000 00000001 ${blob('02010000')}`],
  ['SET_STATEBLOB encrypted flag', `0000000d 00000002 00000001 ${blob('0201000a000500000010', '000000000000')}`],
  ['SET_STATEBLOB blob says encrypted', `0000000d 00000000 00000001 ${blob('0201000a000500000010', '000000000000')}`],
  ['SET_STATEBLOB blob says migration-encrypted', `0000000d 00000000 00000001 ${blob('0201000a000600000010', '000000000000')}`],
  ['SET_STATEBLOB min_version 3', `0000000d 00000000 00000001 ${blob('0203000a000400000010', '000000000000')}`],
  ['INIT with an extra byte', '00000002 00000000 00'],
  ['STOP with an extra byte', '0000000e 00'],
  ['SET_LOCALITY 1 byte', '00000005 00'],
  ['INIT', '00000002 00000000'],
  ['GET_TPMESTABLISHED', '00000004'],
  ['SET_LOCALITY 4', '00000005 04000000'],
  ['RESET_TPMESTABLISHED loc 3', '0000000b 03000000'],
  ['RESET_TPMESTABLISHED loc 7', '0000000b 07000000'],
  ['CANCEL', '00000009'],
  ['SET_BUFFERSIZE while running', '00000011 00001000'],
  ['SET_BUFFERSIZE query while running', '00000011 00000000'],
  ['GET_STATEBLOB savestate (none)', '0000000c 00000001 00000003 00000000'],
  ['GET_STATEBLOB unknown type', '0000000c 00000001 00000009 00000000'],
  ['SET_STATEBLOB while running', '0000000d 00000000 00000001 00000000'],
  ['INIT again while running', '00000002 00000001'],
  ['STOP', '0000000e'],
  ['STOP twice', '0000000e'],
  ['GET_TPMESTABLISHED stopped', '00000004'],
  ['SET_STATEBLOB clear savestate', '0000000d 00000000 00000003 00000000'],
  ['INIT after STOP', '00000002 00000000'],
  ['SHUTDOWN', '00000003'],
];

describe('control replies are byte-identical to swtpm 0.7.1', () => {
  it('for a sequence through every command in every power state, errors included', async () => {
    const [a, b] = await Promise.all([CtrlClient.connect(ours), CtrlClient.connect(peer)]);
    const diffs: string[] = [];
    for (const [label, msg] of SEQUENCE) {
      const [ra, rb] = await Promise.all([exchange(a, msg), exchange(b, msg)]);
      if (ra !== rb) diffs.push(`${label}: ours ${ra} swtpm ${rb}`);
    }
    a.close();
    b.close();
    expect(diffs).toEqual([]);
  });

  it('for messages still incomplete after 500 ms: no reply, connection closed', async () => {
    await restartSwtpm();
    for (const msg of ['00000002 0000', '0000000c 00000001', '0000', `0000000d 00000000 00000001 00000064 ${'00'.repeat(10)}`]) {
      const got = await Promise.all(
        [ours, peer].map(async (path) => {
          const c = await CtrlClient.connect(path);
          c.write(msg);
          const r = await c.read(4, 2000);
          await c.read(1, 200);
          c.close();
          return `${r.toString('hex')}/${c.closed ? 'closed' : 'open'}`;
        }),
      );
      expect(got[0], msg).toBe(got[1]);
      expect(got[0]).toBe('/closed');
    }
  });

  it('GET_STATEBLOB permanent: same 16-byte header shape and blob header', async () => {
    await restartSwtpm();
    const [a, b] = await Promise.all([CtrlClient.connect(ours), CtrlClient.connect(peer)]);
    for (const c of [a, b]) expect(await c.cmd('00000002 00000000', 4, 10_000)).toBe('00000000');
    // Read by the header's own length, not by silence: a loaded machine may pause mid-blob.
    const getBlob = async (c: CtrlClient): Promise<string> => {
      const head = await c.cmd('0000000c 00000001 00000001 00000000', 16, 10_000);
      expect(head).toHaveLength(32);
      return head + (await c.read(parseInt(head.slice(24, 32), 16), 10_000)).toString('hex');
    };
    const [ra, rb] = await Promise.all([getBlob(a), getBlob(b)]);
    // result, flags, totlength = length; then version 2, min 1, hdrsize 10, flags MIGRATION_DATA.
    for (const r of [ra, rb]) {
      expect(r.slice(0, 16)).toBe('0000000000000000');
      expect(r.slice(16, 24)).toBe(r.slice(24, 32));
      expect(r.length / 2).toBe(16 + parseInt(r.slice(16, 24), 16));
      expect(r.slice(32, 44)).toBe('0201000a0004');
    }
    a.close();
    b.close();
  });
});
