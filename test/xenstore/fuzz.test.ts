// Hostile input against a live daemon: 100 000+ random and mutated frames over the dom0 socket and a
// guest socket. After each batch a sentinel READ must be answered (or the daemon must have closed
// that connection alone); at the end the daemon process is alive and serves a well-behaved client.
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { HEADER_SIZE, XsReceiver, XsType, encodeMessage, encodeStrings, encodeWrite } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { connectClient, startDaemon, type Daemon } from './helpers.js';

const TOTAL = 100_000;
const BATCH = 500;
const SENTINEL = 0xfeedf00d;
const GUEST = 9;

let d: Daemon;
let dom0: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  dom0 = await connectClient(d.socket);
  await dom0.write('/fuzz/a', 'seed');
  await dom0.write('/sentinel', 'alive');
  await dom0.setPerms('/sentinel', [{ domid: 0, access: 'r' }]);
});
afterAll(async () => {
  await dom0?.close();
  await d?.stop();
});

/** Valid requests of every kind, the raw material for mutation. */
const SEEDS: Array<[number, Buffer]> = [
  [XsType.READ, encodeStrings('/fuzz/a')],
  [XsType.READ, encodeStrings('data/rel')],
  [XsType.WRITE, encodeWrite('/fuzz/a', 'value')],
  [XsType.WRITE, encodeWrite('data/rel', 'v')],
  [XsType.MKDIR, encodeStrings('/fuzz/dir')],
  [XsType.RM, encodeStrings('/fuzz/dir')],
  [XsType.DIRECTORY, encodeStrings('/')],
  [XsType.DIRECTORY_PART, encodeStrings('/fuzz', '0')],
  [XsType.GET_PERMS, encodeStrings('/fuzz/a')],
  [XsType.SET_PERMS, encodeStrings('/fuzz/a', 'n0', 'r9')],
  [XsType.WATCH, encodeStrings('/fuzz', 'tok')],
  [XsType.UNWATCH, encodeStrings('/fuzz', 'tok')],
  [XsType.WATCH, encodeStrings('@introduceDomain', 'i')],
  [XsType.TRANSACTION_START, encodeStrings('')],
  [XsType.TRANSACTION_END, encodeStrings('T')],
  [XsType.INTRODUCE, encodeStrings('40', '0', '0')],
  [XsType.RELEASE, encodeStrings('40')],
  [XsType.GET_DOMAIN_PATH, encodeStrings('5')],
  [XsType.IS_DOMAIN_INTRODUCED, encodeStrings('9')],
  [XsType.RESET_WATCHES, encodeStrings('')],
];

const u32 = fc.integer({ min: 0, max: 0xffffffff });

/** A frame whose header length matches its payload (so the stream stays aligned). */
const randomFrame = fc
  .record({
    type: fc.oneof(fc.integer({ min: 0, max: 30 }), u32),
    reqId: u32,
    txId: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 20 }), u32),
    payload: fc.oneof(
      fc.uint8Array({ maxLength: 64 }),
      fc.uint8Array({ minLength: 4000, maxLength: 4096 }),
      fc.string({ maxLength: 40 }).map((s) => new Uint8Array(Buffer.from(s + '\0'))),
    ),
  })
  .map((f) => encodeMessage(f.type, f.reqId, f.txId, Buffer.from(f.payload)));

const mutatedFrame = fc
  .record({
    seed: fc.integer({ min: 0, max: SEEDS.length - 1 }),
    op: fc.integer({ min: 0, max: 6 }),
    pos: fc.nat(),
    byte: fc.integer({ min: 0, max: 255 }),
    extra: fc.uint8Array({ maxLength: 32 }),
    txId: fc.oneof(fc.constant(0), u32),
    type: u32,
  })
  .map(({ seed, op, pos, byte, extra, txId, type }) => {
    const [t, p0] = SEEDS[seed]!;
    let p = Buffer.from(p0);
    let ty = t;
    let tx = 0;
    const at = p.length ? pos % p.length : 0;
    switch (op) {
      case 0: // flip a byte
        if (p.length) p[at] = byte;
        break;
      case 1: // drop the tail (often the terminating NUL)
        p = p.subarray(0, at);
        break;
      case 2: // append junk
        p = Buffer.concat([p, Buffer.from(extra)]);
        break;
      case 3: // insert a NUL or a slash
        p = Buffer.concat([p.subarray(0, at), Buffer.from([byte & 1 ? 0 : 0x2f]), p.subarray(at)]);
        break;
      case 4: // foreign transaction id
        tx = txId;
        break;
      case 5: // wrong type for the payload
        ty = type % 32;
        break;
      case 6: // oversized payload of the right type
        p = Buffer.concat([p, Buffer.alloc(4096 - p.length, byte)]);
        break;
    }
    return encodeMessage(ty, 1, tx, p.subarray(0, 4096));
  });

const frameArb = fc.oneof(randomFrame, mutatedFrame);

/** What to do at the end of a batch: nothing, or break the framing and expect to be cut off. */
type Ending = 'sentinel' | 'oversize' | 'truncated';

async function runBatch(socketPath: string, frames: Buffer[], ending: Ending): Promise<'answered' | 'closed'> {
  const sock = net.createConnection(socketPath);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  sock.on('error', () => {});
  return new Promise((resolve, reject) => {
    let answered = false;
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`batch ending "${ending}" got neither the sentinel reply nor a close`));
    }, 15_000);
    const rx = new XsReceiver((m) => {
      if (m.reqId === SENTINEL && m.type === XsType.READ && m.payload.toString() === 'alive') {
        answered = true;
        clearTimeout(timer);
        sock.destroy();
        resolve('answered');
      }
    });
    sock.on('data', (b: Buffer) => rx.push(b));
    sock.on('close', () => {
      clearTimeout(timer);
      if (!answered) resolve('closed');
    });
    sock.write(Buffer.concat(frames));
    if (ending === 'sentinel') sock.write(encodeMessage(XsType.READ, SENTINEL, 0, encodeStrings('/sentinel')));
    else if (ending === 'oversize') {
      const h = Buffer.alloc(HEADER_SIZE);
      h.writeUInt32LE(XsType.WRITE, 0);
      h.writeUInt32LE(4097 + (frames.length % 100000), 12);
      sock.write(h);
    } else {
      // a header promising more than ever comes, then hang up: the daemon drops the half frame
      const h = Buffer.alloc(HEADER_SIZE);
      h.writeUInt32LE(XsType.READ, 0);
      h.writeUInt32LE(100, 12);
      sock.end(h);
    }
  });
}

describe('xs_wire fuzzing against a live xenstored', () => {
  it(`survives ${TOTAL} random and mutated frames and keeps serving`, async () => {
    const frames = fc.sample(frameArb, { numRuns: TOTAL, seed: 20261123 });
    expect(frames.length).toBeGreaterThanOrEqual(TOTAL);
    let sent = 0;
    let answered = 0;
    let closed = 0;
    for (let b = 0; sent < frames.length; b++) {
      const batch = frames.slice(sent, sent + BATCH);
      sent += batch.length;
      const guest = b % 3 === 2;
      if (guest) await dom0.introduce(GUEST); // fuzzed dom0 frames may have released it
      const ending: Ending = b % 25 === 24 ? 'oversize' : b % 25 === 23 ? 'truncated' : 'sentinel';
      const r = await runBatch(guest ? d.domSocket(GUEST) : d.socket, batch, ending);
      if (r === 'answered') answered++;
      else closed++;
      if (ending === 'sentinel') expect(r, `batch ${b}`).toBe('answered');
      if (ending === 'oversize') expect(r, `batch ${b}`).toBe('closed');
    }
    expect(sent).toBeGreaterThanOrEqual(100_000);
    expect(answered + closed).toBe(Math.ceil(TOTAL / BATCH));
    // still alive and well
    expect(d.proc.exitCode).toBeNull();
    const c = await connectClient(d.socket);
    await c.write('/after/fuzz', 'fine');
    expect(await c.readString('/after/fuzz')).toBe('fine');
    const w = await c.watch('/after');
    expect((await w.next())?.path).toBe('/after');
    await c.write('/after/fuzz', 'again');
    expect((await w.next())?.path).toBe('/after/fuzz');
    expect(await c.transaction(async (tx) => c.readString('/after/fuzz', tx))).toBe('again');
    await c.close();
    expect(d.stderr()).not.toMatch(/internal error/);
  });
});
