// The TCTI bridge driven by real tpm2-tools (swtpm TCTI) with a real swtpm as the TPM behind
// `transmit`, plus the control port's bytes compared with swtpm's own control port.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TctiBridge, type TctiClientError } from '../../src/frontend/tcti-bridge.js';
import { ctrlExchange, readReply, SwtpmClient, SwtpmProcess } from './swtpm-peer.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// TPM2_GetRandom(8): tag 8001, size 12, cc 0x17B, bytesRequested 8.
const GET_RANDOM_8 = hex('80 01 00 00 00 0c 00 00 01 7b 00 08');
// TPM2_PCR_Reset(PCR 20) with an empty password session: PCR 20 may only be reset from locality
// 2 or 4 (PC Client PCR attributes in libtpms), so the answer shows which locality the TPM saw.
const PCR_RESET_20 = hex('80 02 00 00 00 1b 00 00 01 3d 00 00 00 14 00 00 00 09 40 00 00 09 00 00 00 00 00');
const PCR_RESET_OK = hex('80 02 00 00 00 13 00 00 00 00 00 00 00 00 00 00 01 00 00');
const TPM_RC_LOCALITY = hex('80 01 00 00 00 0a 00 00 09 07');
const TPM_RC_COMMAND_SIZE = hex('80 01 00 00 00 0a 00 00 01 42');

interface ToolResult {
  code: number;
  stdout: Buffer;
  stderr: string;
}

/** Runs a tpm2-tools program asynchronously (the bridge lives in this process's event loop). */
function tool(name: string, args: string[], port: number, cwd: string): Promise<ToolResult> {
  return new Promise((resolve) => {
    execFile(
      name,
      [...args, '-T', `swtpm:host=127.0.0.1,port=${port}`],
      { cwd, encoding: 'buffer', env: { ...process.env, TPM2TOOLS_TCTI: undefined } },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        resolve({ code, stdout, stderr: stderr.toString() });
      },
    );
  });
}

async function ok(name: string, args: string[], port: number, cwd: string): Promise<Buffer> {
  const r = await tool(name, args, port, cwd);
  if (r.code !== 0) throw new Error(`${name} ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/** One connection to a data port: send bytes, collect the replies until the bridge closes or goes quiet. */
async function dataExchange(port: number, req: Uint8Array, opts: { want?: number; end?: boolean; quietMs?: number } = {}) {
  return ctrlExchange(port, req, opts);
}

describe('TCTI bridge with tpm2-tools and a real swtpm', () => {
  let dir: string;
  let swtpm: SwtpmProcess;
  let client: SwtpmClient;
  let bridge: TctiBridge;
  const seen: { locality: number; cmd: Buffer }[] = [];
  let inFlight = 0;
  let maxInFlight = 0;
  let cancels = 0;
  const inits: number[] = [];
  const errors: TctiClientError[] = [];

  beforeAll(async () => {
    dir = tempDir('tcti');
    swtpm = await SwtpmProcess.start({ stateDir: dir, transport: 'tcp', flags: 'not-need-init' });
    client = new SwtpmClient(swtpm);
    bridge = await TctiBridge.start({
      host: '127.0.0.1',
      port: 0,
      transmit: async (cmd, opts) => {
        seen.push({ locality: opts.locality, cmd: Buffer.from(cmd) });
        inFlight++;
        maxInFlight = Math.max(maxInFlight, inFlight);
        try {
          return await client.transmit(cmd, opts);
        } finally {
          inFlight--;
        }
      },
      cancel: () => {
        cancels++;
      },
      init: async (flags) => {
        inits.push(flags);
        await client.init(flags);
      },
    });
    bridge.on('clientError', (e) => errors.push(e));
  });

  afterAll(async () => {
    await bridge?.stop();
    client?.close();
    await swtpm?.stop();
    removeDir(dir);
  });

  it('listens on a consecutive data/control pair', () => {
    expect(bridge.ctrlPort).toBe(bridge.port + 1);
    expect(bridge.port).toBeGreaterThan(0);
  });

  it('tpm2_startup -c runs through the bridge, and the TCTI set locality 0 first', async () => {
    await ok('tpm2_startup', ['-c'], bridge.port, dir);
    // TPM2_Startup(SU_CLEAR) = 80 01 00 00 00 0c 00 00 01 44 00 00
    expect(seen.at(-1)!.cmd).toEqual(hex('80 01 00 00 00 0c 00 00 01 44 00 00'));
    expect(seen.at(-1)!.locality).toBe(0);
  });

  it('tpm2_getrandom returns the requested number of bytes', async () => {
    const out = (await ok('tpm2_getrandom', ['16', '--hex'], bridge.port, dir)).toString().trim();
    expect(out).toMatch(/^[0-9a-f]{32}$/);
  });

  it('tpm2_pcrextend + tpm2_pcrread agree with a SHA-256 model of PCR 16', async () => {
    await ok('tpm2_pcrread', ['sha256:16', '-o', 'pcr0.bin'], bridge.port, dir);
    let model = readFileSync(join(dir, 'pcr0.bin'));
    expect(model.length).toBe(32);
    for (const word of ['vtpm-split', 'tcti bridge']) {
      const d = createHash('sha256').update(word).digest();
      await ok('tpm2_pcrextend', [`16:sha256=${d.toString('hex')}`], bridge.port, dir);
      model = createHash('sha256').update(Buffer.concat([model, d])).digest();
    }
    await ok('tpm2_pcrread', ['sha256:16', '-o', 'pcr2.bin'], bridge.port, dir);
    expect(readFileSync(join(dir, 'pcr2.bin')).toString('hex')).toBe(model.toString('hex'));
  });

  it('tpm2_createprimary, tpm2_create and tpm2_load work, and the loaded key reads back', async () => {
    await ok('tpm2_createprimary', ['-C', 'o', '-G', 'ecc', '-c', 'primary.ctx'], bridge.port, dir);
    // No resource manager sits between the tools and the TPM (as with swtpm itself), so objects
    // each tool leaves loaded must be flushed or the TPM's three transient slots fill up.
    await ok('tpm2_flushcontext', ['-t'], bridge.port, dir);
    await ok('tpm2_create', ['-C', 'primary.ctx', '-G', 'ecc', '-u', 'key.pub', '-r', 'key.priv'], bridge.port, dir);
    await ok('tpm2_flushcontext', ['-t'], bridge.port, dir);
    const load = (await ok('tpm2_load', ['-C', 'primary.ctx', '-u', 'key.pub', '-r', 'key.priv', '-c', 'key.ctx'], bridge.port, dir)).toString();
    expect(existsSync(join(dir, 'key.ctx'))).toBe(true);
    const name = /name:\s*([0-9a-f]+)/.exec(load)?.[1];
    expect(name).toMatch(/^000b[0-9a-f]{64}$/);
    const pub = (await ok('tpm2_readpublic', ['-c', 'key.ctx'], bridge.port, dir)).toString();
    expect(pub).toContain(`name: ${name}`);
    await ok('tpm2_flushcontext', ['-t'], bridge.port, dir);
  });

  it('tpm2_nvdefine / nvwrite / nvread round-trip 32 bytes', async () => {
    const data = randomBytes(32);
    writeFileSync(join(dir, 'nv.in'), data);
    await ok('tpm2_nvdefine', ['0x1500016', '-C', 'o', '-s', '32', '-a', 'ownerread|ownerwrite'], bridge.port, dir);
    await ok('tpm2_nvwrite', ['0x1500016', '-C', 'o', '-i', 'nv.in'], bridge.port, dir);
    const out = await ok('tpm2_nvread', ['0x1500016', '-C', 'o', '-s', '32'], bridge.port, dir);
    expect(out.toString('hex')).toBe(data.toString('hex'));
    await ok('tpm2_nvundefine', ['0x1500016', '-C', 'o'], bridge.port, dir);
  });

  it('serialises commands from concurrent clients: transmit never overlaps', async () => {
    maxInFlight = 0;
    const runs = [
      ...Array.from({ length: 4 }, () => ok('tpm2_getrandom', ['8', '--hex'], bridge.port, dir)),
      ...Array.from({ length: 8 }, () => dataExchange(bridge.port, GET_RANDOM_8, { want: 20 })),
    ];
    const results = await Promise.all(runs);
    expect(maxInFlight).toBe(1);
    for (const r of results.slice(4)) {
      const { reply } = r as { reply: Buffer };
      expect(reply.subarray(0, 12)).toEqual(hex('80 01 00 00 00 14 00 00 00 00 00 08'));
    }
  });

  it('locality set on the control port reaches transmit and the TPM; the TCTI puts it back to 0', async () => {
    const set = async (loc: number) =>
      (await ctrlExchange(bridge.ctrlPort, Uint8Array.of(0, 0, 0, 5, loc), { want: 4 })).reply;
    expect(await set(3)).toEqual(hex('00 00 00 00'));
    expect(bridge.locality).toBe(3);
    expect((await dataExchange(bridge.port, PCR_RESET_20, { want: 10, quietMs: 500 })).reply).toEqual(TPM_RC_LOCALITY);
    expect(seen.at(-1)!.locality).toBe(3);
    expect(await set(2)).toEqual(hex('00 00 00 00'));
    expect((await dataExchange(bridge.port, PCR_RESET_20, { want: PCR_RESET_OK.length })).reply).toEqual(PCR_RESET_OK);
    expect(seen.at(-1)!.locality).toBe(2);
    // The swtpm TCTI sends SET_LOCALITY(0) when it initialises.
    await ok('tpm2_getrandom', ['4'], bridge.port, dir);
    expect(seen.at(-1)!.locality).toBe(0);
    expect(bridge.locality).toBe(0);
  });

  // Each pair: request bytes, and the reply swtpm 0.7.1 gives on its own control port.
  const sameAsSwtpm: [string, string, string][] = [
    ['SET_LOCALITY 0, the TCTI form (1 payload byte)', '00 00 00 05 00', '00 00 00 00'],
    ['SET_LOCALITY 2, the QEMU form (4-byte union)', '00 00 00 05 02 00 00 00', '00 00 00 00'],
    ['SET_LOCALITY 4', '00 00 00 05 04', '00 00 00 00'],
    ['SET_LOCALITY 5 -> TPM_BAD_LOCALITY', '00 00 00 05 05', '00 00 00 3d'],
    ['unknown command 0xffff -> TPM_BAD_ORDINAL', '00 00 ff ff', '00 00 00 0a'],
    ['CANCEL_TPM_CMD with a stray byte -> TPM_BAD_PARAMETER', '00 00 00 09 00', '00 00 00 03'],
    ['INIT with 5 payload bytes -> TPM_BAD_PARAMETER', '00 00 00 02 00 00 00 01 00', '00 00 00 03'],
  ];
  for (const [what, req, rsp] of sameAsSwtpm) {
    it(`control ${what}: ${req} -> ${rsp}, byte for byte as swtpm`, async () => {
      const theirs = await ctrlExchange(swtpm.ctrlPort, hex(req), { want: 4 });
      const ours = await ctrlExchange(bridge.ctrlPort, hex(req), { want: 4 });
      expect(theirs.reply).toEqual(hex(rsp));
      expect(ours.reply).toEqual(hex(rsp));
    });
  }

  it('keeps a control connection open across commands, as swtpm does', async () => {
    for (const port of [swtpm.ctrlPort, bridge.ctrlPort]) {
      const s = net.connect({ host: '127.0.0.1', port });
      await new Promise((r) => s.once('connect', r));
      expect((await readReply(s, hex('00 00 ff ff'), { want: 4 }, false)).reply).toEqual(hex('00 00 00 0a'));
      expect((await readReply(s, hex('00 00 00 05 07'), { want: 4 }, false)).reply).toEqual(hex('00 00 00 3d'));
      expect((await readReply(s, hex('00 00 00 05 00'), { want: 4 }, true)).reply).toEqual(hex('00 00 00 00'));
    }
    expect(bridge.locality).toBe(0);
  });

  it('SET_STATEBLOB is read to its end and refused (TPM_BAD_ORDINAL); the connection goes on, as swtpm', async () => {
    // Header (flags 0, type permanent, length 8) and the 8 blob bytes, then SET_LOCALITY 0 on the same connection.
    for (const port of [swtpm.ctrlPort, bridge.ctrlPort]) {
      const s = net.connect({ host: '127.0.0.1', port });
      await new Promise((r) => s.once('connect', r));
      const blob = hex('00 00 00 0d 00 00 00 00 00 00 00 01 00 00 00 08 01 02 03 04 05 06 07 08');
      expect((await readReply(s, blob, { want: 4 }, false)).reply).toEqual(hex('00 00 00 0a'));
      expect((await readReply(s, hex('00 00 00 05 00'), { want: 4 }, true)).reply).toEqual(hex('00 00 00 00'));
    }
  });

  it('a control message cut off by EOF gets no reply and the connection closes, as swtpm', async () => {
    errors.length = 0;
    for (const port of [swtpm.ctrlPort, bridge.ctrlPort]) {
      const r = await ctrlExchange(port, hex('00 00 00 02 00 00'), { end: true });
      expect(r.reply.length).toBe(0);
      expect(r.closed).toBe(true);
    }
    expect(inits).toEqual([]);
    expect(errors.map((e) => e.code)).toEqual(['CTRL_TRUNCATED']);
    expect(errors[0]!.message).toMatch(/127\.0\.0\.1:\d+ on control port/);
  });

  it('a control message left incomplete is dropped after swtpm\'s 500 ms with the connection closed', async () => {
    errors.length = 0;
    for (const port of [swtpm.ctrlPort, bridge.ctrlPort]) {
      const r = await ctrlExchange(port, hex('00 00 00 05'), { quietMs: 5000 });
      expect(r.reply.length).toBe(0);
      expect(r.closed).toBe(true);
    }
    expect(errors.map((e) => e.code)).toEqual(['CTRL_TIMEOUT']);
    expect(bridge.locality).toBe(0);
  });

  it('GET_CAPABILITY advertises exactly what is wired: INIT | SET_LOCALITY | CANCEL_TPM_CMD', async () => {
    const ours = await ctrlExchange(bridge.ctrlPort, hex('00 00 00 01'), { want: 8 });
    expect(ours.reply).toEqual(hex('00 00 00 00 00 00 00 29'));
    const theirs = await ctrlExchange(swtpm.ctrlPort, hex('00 00 00 01'), { want: 8 });
    expect(theirs.reply.subarray(0, 4)).toEqual(hex('00 00 00 00'));
  });

  it('CANCEL_TPM_CMD reaches the cancel hook: 00 00 00 09 -> 00 00 00 00', async () => {
    const before = cancels;
    expect((await ctrlExchange(bridge.ctrlPort, hex('00 00 00 09'), { want: 4 })).reply).toEqual(hex('00 00 00 00'));
    expect(cancels).toBe(before + 1);
  });

  it('an oversize command gets TPM_RC_COMMAND_SIZE, is never transmitted, and the connection goes on', async () => {
    const count = seen.length;
    errors.length = 0;
    const big = Buffer.alloc(4097, 0xee);
    hex('80 01 00 00 10 01 00 00 01 7b').copy(big); // size 4097 > 4096
    const { reply } = await dataExchange(bridge.port, Buffer.concat([big, GET_RANDOM_8]), { want: 30 });
    expect(reply.subarray(0, 10)).toEqual(TPM_RC_COMMAND_SIZE);
    expect(reply.subarray(10, 22)).toEqual(hex('80 01 00 00 00 14 00 00 00 00 00 08'));
    expect(seen.length).toBe(count + 1);
    expect(seen.at(-1)!.cmd).toEqual(GET_RANDOM_8);
    expect(errors.map((e) => e.code)).toEqual(['CMD_TOO_LARGE']);
  });

  it('an oversize TPM 1.2 command gets the 1.2 size error (00 C4, TPM_BAD_PARAM_SIZE), as libtpms answers', async () => {
    const count = seen.length;
    errors.length = 0;
    const big = Buffer.alloc(4097, 0xee);
    hex('00 c2 00 00 10 01 00 00 00 46').copy(big); // AUTH1-tagged, size 4097 > 4096
    const { reply } = await dataExchange(bridge.port, Buffer.concat([big, GET_RANDOM_8]), { want: 30 });
    expect(reply.subarray(0, 10)).toEqual(hex('00 c4 00 00 00 0a 00 00 00 19'));
    expect(seen.length).toBe(count + 1);
    expect(errors.map((e) => e.code)).toEqual(['CMD_TOO_LARGE']);
  });

  it('a commandSize below 10 gets TPM_RC_COMMAND_SIZE and the connection is closed', async () => {
    const count = seen.length;
    const r = await dataExchange(bridge.port, hex('80 01 00 00 00 09 00 00 01 7b'));
    expect(r.reply).toEqual(TPM_RC_COMMAND_SIZE);
    expect(r.closed).toBe(true);
    expect(seen.length).toBe(count);
  });

  it('reassembles a command written one byte at a time', async () => {
    const s = net.connect({ host: '127.0.0.1', port: bridge.port });
    await new Promise((r) => s.once('connect', r));
    s.setNoDelay(true);
    const got = new Promise<Buffer>((resolve) => {
      let b = Buffer.alloc(0);
      s.on('data', (d: Buffer) => {
        b = Buffer.concat([b, d]);
        if (b.length >= 20) resolve(b);
      });
    });
    for (const byte of GET_RANDOM_8) {
      s.write(Uint8Array.of(byte));
      await new Promise((r) => setTimeout(r, 2));
    }
    expect((await got).subarray(0, 12)).toEqual(hex('80 01 00 00 00 14 00 00 00 00 00 08'));
    s.destroy();
  });

  it('fuzz: random bytes on the data port never crash the bridge; a good client keeps working', async () => {
    const good = net.connect({ host: '127.0.0.1', port: bridge.port });
    await new Promise((r) => good.once('connect', r));
    errors.length = 0;
    const transmitted = seen.length;
    const tag = fc.constantFrom(0x8001, 0x8002, 0x00c1, 0x0000, 0xffff);
    const size = fc.oneof(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 4090, max: 4100 }), fc.integer({ min: 0, max: 0xffffffff }));
    const framed = fc.tuple(tag, size, fc.uint8Array({ maxLength: 64 })).map(([t, s, body]) => {
      const b = Buffer.alloc(6 + body.length);
      b.writeUInt16BE(t, 0);
      b.writeUInt32BE(s, 2);
      b.set(body, 6);
      return new Uint8Array(b);
    });
    const chunk = fc.oneof(fc.uint8Array({ maxLength: 200 }), framed);
    await fc.assert(
      fc.asyncProperty(fc.array(chunk, { minLength: 1, maxLength: 4 }), async (chunks) => {
        const r = await dataExchange(bridge.port, Buffer.concat(chunks), { end: true, quietMs: 5000 });
        expect(r.closed).toBe(true);
        // Whatever came back is whole TPM responses, one after another.
        let off = 0;
        while (off < r.reply.length) {
          expect(r.reply.length - off).toBeGreaterThanOrEqual(10);
          const n = r.reply.readUInt32BE(off + 2);
          expect(n).toBeGreaterThanOrEqual(10);
          off += n;
        }
        expect(off).toBe(r.reply.length);
      }),
      { numRuns: 150 },
    );
    expect(maxInFlight).toBe(1);
    // The generator reached every path: rejections of each kind and commands sent to the TPM.
    expect(new Set(errors.map((e) => e.code))).toEqual(new Set(['CMD_TOO_LARGE', 'CMD_TOO_SMALL', 'CMD_TRUNCATED']));
    expect(seen.length).toBeGreaterThan(transmitted);
    const { reply } = await readReply(good, GET_RANDOM_8, { want: 20 });
    expect(reply.subarray(0, 12)).toEqual(hex('80 01 00 00 00 14 00 00 00 00 00 08'));
    expect((await tool('tpm2_getrandom', ['8', '--hex'], bridge.port, dir)).code).toBe(0);
  });

  it('INIT (what Tss2_Tcti_Swtpm_Reset sends) reaches the TPM in command order; Startup is then needed again', async () => {
    const { reply } = await ctrlExchange(bridge.ctrlPort, hex('00 00 00 02 00 00 00 01'), { want: 4 });
    expect(reply).toEqual(hex('00 00 00 00'));
    expect(inits).toEqual([1]);
    // A freshly initialised TPM answers TPM_RC_INITIALIZE until TPM2_Startup.
    expect((await dataExchange(bridge.port, GET_RANDOM_8, { want: 10 })).reply).toEqual(hex('80 01 00 00 00 0a 00 00 01 00'));
    await ok('tpm2_startup', ['-c'], bridge.port, dir);
    expect((await tool('tpm2_getrandom', ['8', '--hex'], bridge.port, dir)).code).toBe(0);
  });
});

describe('TCTI bridge options and failures (no TPM needed to prove these)', () => {
  const hex2 = hex;
  let bridges: TctiBridge[] = [];
  afterAll(async () => {
    await Promise.all(bridges.map((b) => b.stop()));
    bridges = [];
  });

  it('maxCommandSize is an option: 64 accepts 64 bytes and rejects 65', async () => {
    const got: number[] = [];
    const b = await TctiBridge.start({
      port: 0,
      maxCommandSize: 64,
      transmit: async (cmd) => (got.push(cmd.length), hex2('80 01 00 00 00 0a 00 00 00 00')),
    });
    bridges.push(b);
    const at = (n: number) => {
      const c = Buffer.alloc(n);
      hex2('80 01').copy(c);
      c.writeUInt32BE(n, 2);
      return c;
    };
    expect((await dataExchange(b.port, at(64), { want: 10 })).reply).toEqual(hex2('80 01 00 00 00 0a 00 00 00 00'));
    expect((await dataExchange(b.port, at(65), { want: 10 })).reply).toEqual(TPM_RC_COMMAND_SIZE);
    expect(got).toEqual([64]);
    await expect(TctiBridge.start({ port: 0, maxCommandSize: 9, transmit: async (c) => c })).rejects.toThrow(RangeError);
  });

  it('a transmit that fails is answered TPM_RC_FAILURE and reported; the bridge keeps serving', async () => {
    let fail = true;
    const errs: TctiClientError[] = [];
    const b = await TctiBridge.start({
      port: 0,
      transmit: async () => {
        if (fail) throw new Error('vTPM gone');
        return hex2('80 01 00 00 00 0a 00 00 00 00');
      },
    });
    b.on('clientError', (e) => errs.push(e));
    bridges.push(b);
    expect((await dataExchange(b.port, GET_RANDOM_8, { want: 10 })).reply).toEqual(hex2('80 01 00 00 00 0a 00 00 01 01'));
    expect(errs.map((e) => e.code)).toEqual(['TRANSMIT_FAILED']);
    fail = false;
    expect((await dataExchange(b.port, GET_RANDOM_8, { want: 10 })).reply).toEqual(hex2('80 01 00 00 00 0a 00 00 00 00'));
  });

  it('without cancel/init hooks those commands are TPM_BAD_ORDINAL and not advertised; reject-locality-4 works', async () => {
    const b = await TctiBridge.start({ port: 0, rejectLocality4: true, transmit: async (c) => c });
    bridges.push(b);
    const x = async (req: string, want = 4) => (await ctrlExchange(b.ctrlPort, hex2(req), { want })).reply;
    expect(await x('00 00 00 01', 8)).toEqual(hex2('00 00 00 00 00 00 00 08'));
    expect(await x('00 00 00 09')).toEqual(hex2('00 00 00 0a'));
    expect(await x('00 00 00 02 00 00 00 01')).toEqual(hex2('00 00 00 0a'));
    expect(await x('00 00 00 05 04')).toEqual(hex2('00 00 00 3d'));
    expect(await x('00 00 00 05 03')).toEqual(hex2('00 00 00 00'));
    expect(b.locality).toBe(3);
  });

  it('a port already taken is an error; a fixed port is honoured with control on port + 1', async () => {
    const first = await TctiBridge.start({ port: 0, transmit: async (c) => c });
    bridges.push(first);
    await expect(TctiBridge.start({ port: first.port, transmit: async (c) => c })).rejects.toMatchObject({ code: 'EADDRINUSE' });
    const port = first.port;
    await first.stop();
    const again = await TctiBridge.start({ port, transmit: async (c) => c });
    bridges.push(again);
    expect([again.port, again.ctrlPort]).toEqual([port, port + 1]);
  });

  it('fuzz: random bytes on the control port never crash the bridge; a good client still works', async () => {
    let inits = 0;
    let cancels = 0;
    const b = await TctiBridge.start({
      port: 0,
      transmit: async (c) => c,
      init: () => void inits++,
      cancel: () => void cancels++,
    });
    bridges.push(b);
    const known = fc.constantFrom(1, 2, 4, 5, 7, 9, 0x0d, 0x10, 0xffff).map((c) => {
      const b4 = Buffer.alloc(4);
      b4.writeUInt32BE(c);
      return new Uint8Array(b4);
    });
    const chunk = fc.oneof(known, fc.uint8Array({ maxLength: 40 }));
    await fc.assert(
      fc.asyncProperty(fc.array(chunk, { minLength: 1, maxLength: 5 }), async (chunks) => {
        const r = await ctrlExchange(b.ctrlPort, Buffer.concat(chunks), { end: true, quietMs: 5000 });
        expect(r.closed).toBe(true);
        expect(r.reply.length % 4).toBe(0); // our replies here are 4 or 8 bytes
        expect(b.locality).toBeGreaterThanOrEqual(0);
        expect(b.locality).toBeLessThanOrEqual(4);
      }),
      { numRuns: 150 },
    );
    expect((await ctrlExchange(b.ctrlPort, hex2('00 00 00 05 01'), { want: 4 })).reply).toEqual(hex2('00 00 00 00'));
    expect(b.locality).toBe(1);
    expect((await dataExchange(b.port, GET_RANDOM_8, { want: 12 })).reply).toEqual(GET_RANDOM_8);
  });

  it('stop() closes both ports and every open connection', async () => {
    const b = await TctiBridge.start({ port: 0, transmit: async (c) => c });
    const s = net.connect({ host: '127.0.0.1', port: b.ctrlPort });
    await new Promise((r) => s.once('connect', r));
    const closed = new Promise((r) => s.once('close', r));
    s.on('error', () => undefined);
    await b.stop();
    await closed;
    const refused = await new Promise<string>((resolve) => {
      const t = net.connect({ host: '127.0.0.1', port: b.port });
      t.on('connect', () => (t.destroy(), resolve('connected')));
      t.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
    });
    expect(refused).toBe('ECONNREFUSED');
  });
});
