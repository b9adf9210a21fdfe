// A vTPM domain: one instance alone in a child process (node dist/src/tpm/domain-main.js), started,
// health-checked, driven and stopped by its parent; a kill -9 is seen as a crash at once.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { DomainError, VtpmDomain, type DomainExit } from '../../src/tpm/domain-client.js';
import { DomainMsg, FrameReader, encodeFrame } from '../../src/tpm/domain-protocol.js';
import * as tpm12 from '../../src/tpm/tpm12-commands.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { hex, unhex } from './helpers.js';
import { scratchDir } from '../helpers/temp.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');

describe('vTPM-domain process', () => {
  const domains: VtpmDomain[] = [];
  const dirs: Array<() => void> = [];
  afterEach(async () => {
    for (const d of domains.splice(0)) if (d.alive) await d.stop();
    for (const c of dirs.splice(0)) c();
  });

  it('starts, answers health and TPM commands with its own domid, stops cleanly', async () => {
    const t = scratchDir('dom');
    dirs.push(t.cleanup);
    const dom = await VtpmDomain.start({ instance: 4, domid: 12, version: '2.0', stateDir: t.dir });
    domains.push(dom);
    const h = await dom.health();
    expect(h).toMatchObject({ instance: 4, domid: 12, pid: dom.pid, version: '2.0', status: 'running' });
    expect(dom.pid).not.toBe(process.pid);
    expect(await dom.startup('clear')).toBe(0);
    await dom.execute(tpm2.pcrExtendSha256(16, unhex('42'.repeat(32))));
    const pcr = tpm2.parsePcrRead(await dom.execute(tpm2.pcrReadSha256(16)));
    // Bad input is answered, not fatal, across the process boundary too.
    expect(hex(await dom.execute(unhex('8001 00000020 0000017b 0008')))).toBe('80010000000a00000142');
    await dom.saveVolatile();
    const perm = await dom.getStateBlob('permanent');
    expect(hex(perm!.subarray(0, 6))).toBe('0201000a0004');
    const exits: DomainExit[] = [];
    dom.on('exit', (e: DomainExit) => exits.push(e));
    const crash: DomainExit[] = [];
    dom.on('crash', (e: DomainExit) => crash.push(e));
    expect(await dom.stop()).toEqual({ code: 0, signal: null, expected: true });
    expect(exits).toHaveLength(1);
    expect(crash).toHaveLength(0);

    // A new domain on the same state resumes the saved volatile state: same PCR, no Startup needed.
    const again = await VtpmDomain.start({ instance: 4, domid: 13, version: '2.0', stateDir: t.dir });
    domains.push(again);
    expect(hex(tpm2.parsePcrRead(await again.execute(tpm2.pcrReadSha256(16))))).toBe(hex(pcr));
  });

  it('reports kill -9 as a crash and fails pending requests', async () => {
    const t = scratchDir('dom-kill');
    dirs.push(t.cleanup);
    const dom = await VtpmDomain.start({ instance: 1, domid: 20, version: '1.2', stateDir: t.dir });
    domains.push(dom);
    expect(await dom.startup('clear')).toBe(0);
    const crashed = new Promise<DomainExit>((r) => dom.once('crash', r));
    const pending = dom.execute(tpm12.getRandom(16)).catch((e: unknown) => e);
    process.kill(dom.pid, 'SIGKILL');
    expect(await crashed).toEqual({ code: null, signal: 'SIGKILL', expected: false });
    const err = await pending;
    // Either the kill beat the command (CRASHED) or the 1.2 TPM answered first; never a hang.
    if (err instanceof DomainError) expect(err.code).toBe('CRASHED');
    await expect(dom.health()).rejects.toMatchObject({ code: 'CRASHED' });
    expect(dom.alive).toBe(false);
  });

  it('the entry point speaks the framing on stdio: READY first, then replies by id', async () => {
    const t = scratchDir('dom-raw');
    dirs.push(t.cleanup);
    const child = spawn(process.execPath, [join(root, 'dist/src/tpm/domain-main.js'), '--instance', '3', '--domid', '5', '--state-dir', t.dir], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    const reader = new FrameReader();
    const frames: Array<{ type: number; id: number; payload: Uint8Array }> = [];
    child.stdout.on('data', (c: Buffer) => frames.push(...reader.push(new Uint8Array(c))));
    const waitFor = async (n: number) => {
      while (frames.length < n) await new Promise((r) => setTimeout(r, 5));
    };
    await waitFor(1);
    expect(frames[0]!.type).toBe(DomainMsg.READY);
    expect(JSON.parse(Buffer.from(frames[0]!.payload).toString())).toMatchObject({ instance: 3, domid: 5 });
    // EXECUTE id 0x01020304, locality 0, TPM2_Startup(CLEAR): frame bytes spelled out.
    const frame = encodeFrame(DomainMsg.EXECUTE, 0x01020304, unhex('00 8001 0000000c 00000144 0000'));
    expect(hex(frame)).toBe('00000012' + '01' + '01020304' + '00' + '80010000000c000001440000');
    child.stdin.write(frame);
    await waitFor(2);
    expect(frames[1]).toMatchObject({ type: DomainMsg.OK, id: 0x01020304 });
    expect(hex(frames[1]!.payload)).toBe('80010000000a00000000');
    // A frame whose length exceeds the limit is refused before allocation; the domain says so and exits
    // (listen for the exit first: it can come before the polling below sees the third frame).
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    child.stdin.write(unhex('7fffffff 01'));
    await waitFor(3);
    expect(frames[2]!.type).toBe(DomainMsg.ERROR);
    expect(JSON.parse(Buffer.from(frames[2]!.payload).toString())).toMatchObject({ code: 'FRAME_TOO_LARGE' });
    expect(await exited).toBe(2);
  });

  it('`vtpm vtpm-domain` (the CLI) stops cleanly on SIGTERM with its state durable', async () => {
    const t = scratchDir('dom-cli');
    dirs.push(t.cleanup);
    const child = spawn(
      process.execPath,
      [join(root, 'dist/src/cli/main.js'), 'vtpm-domain', '--instance', '9', '--domid', '30', '--state-dir', t.dir],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    const reader = new FrameReader();
    const frames: Array<{ type: number; id: number; payload: Uint8Array }> = [];
    child.stdout.on('data', (c: Buffer) => frames.push(...reader.push(new Uint8Array(c))));
    while (frames.length < 1) await new Promise((r) => setTimeout(r, 5));
    expect(frames[0]!.type).toBe(DomainMsg.READY);
    child.stdin.write(encodeFrame(DomainMsg.STARTUP, 1, Uint8Array.of(0)));
    while (frames.length < 2) await new Promise((r) => setTimeout(r, 5));
    expect(hex(frames[1]!.payload)).toBe('00000000');
    const exited = new Promise<[number | null, string | null]>((r) => child.once('exit', (c, s) => r([c, s])));
    child.kill('SIGTERM');
    expect(await exited).toEqual([0, null]);
    expect(readdirSync(t.dir)).toContain('tpm-9.permanent');
  });
});
