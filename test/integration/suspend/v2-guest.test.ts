// A v2 guest (the default transport) driven through the real CLI and tpm2-tools, against a real host
// (xenstored, manager, backend as processes): suspend and resume from the toolstack and from inside the
// guest, a guest killed with -9 and resumed, a backend killed and restarted, the Startup a guest's
// driver sends at boot, and what the 4088-byte page does to big commands and to GetCapability.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { dist } from '../../helpers/child.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const run = promisify(execFile);
const cli = dist('src/cli/main.js');
const env = { ...process.env, VTPM_NO_SETUP: '1', VTPM_SUSPEND_BOUND_MS: '200' };
/** Every CLI call is bounded: the old v2 suspend never returned. */
const vtpm = (...args: string[]) => run(process.execPath, [cli, ...args], { env, timeout: 30_000 });
const { RunDir } = (await import(dist('src/cli/rundir.js'))) as typeof import('../../../src/cli/rundir.js');
const { restartDaemon } = (await import(dist('src/cli/restart.js'))) as typeof import('../../../src/cli/restart.js');

const work = tempDir('v2-guest');
const runDir = join(work, 'run');
const stateDir = join(work, 'state');

beforeAll(async () => {
  await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
});

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

const tctiEnv = (port: number) => ({ ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` });
/** tpm2-tools through a guest's TCTI bridge, bounded (a hung transport must fail the test, not stall it). */
const tpm2 = (port: number, tool: string, ...args: string[]) => run(tool, args, { env: tctiEnv(port), timeout: 20_000, cwd: work });

const DIGEST = '11'.repeat(32);
async function pcr16(port: number): Promise<string> {
  const { stdout } = await tpm2(port, 'tpm2_pcrread', 'sha256:16');
  return /16\s*:\s*0x([0-9A-F]+)/i.exec(stdout)![1]!.toLowerCase();
}

async function attach(domid: number, vm: string, ...extra: string[]): Promise<number> {
  // A free pair can be taken between the check and the guest's listen (tpm2-tools' client sockets of
  // other test files use ephemeral ports too): then attach fails cleanly, and we try another pair.
  for (let attempt = 0; ; attempt++) {
    const port = await freePortPair();
    try {
      await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', vm, '--tcti-port', String(port), ...extra);
      return port;
    } catch (e) {
      if (attempt >= 3 || !/EADDRINUSE/.test(String((e as Error).message))) throw e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Attached, and started by tpm2_startup too (a no-op when the guest started it at boot): for tests of other things. */
async function attachStarted(domid: number, vm: string, ...extra: string[]): Promise<number> {
  const port = await attach(domid, vm, ...extra);
  await tpm2(port, 'tpm2_startup', '-c');
  return port;
}

async function waitFor(what: string, ok: () => boolean, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('v2 guest: suspend and resume', () => {
  it('guest suspend and guest resume return promptly and PCR 16 survives (tpm2-tools)', async () => {
    const port = await attachStarted(41, randomUUID());
    await tpm2(port, 'tpm2_pcrextend', `16:sha256=${DIGEST}`);
    const before = await pcr16(port);
    expect(before).not.toBe('0'.repeat(64));
    const t0 = Date.now();
    const s = await vtpm('guest', 'suspend', '--run', runDir, '--domid', '41');
    expect(s.stdout).toMatch(/dom41 suspended in [0-9.]+ ms \(0 unanswered\)/);
    expect(new RunDir(runDir).readGuest(41)?.suspended).toBe(true);
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '41');
    expect(Date.now() - t0).toBeLessThan(30_000);
    // A resumed TPM is not started again: a Startup(CLEAR) would have reset PCR 16.
    expect(await pcr16(port)).toBe(before);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '41');
  }, 90_000);

  it('a command in flight when the suspend starts is answered before the guest suspends', async () => {
    const port = await attachStarted(42, randomUUID());
    // An RSA key generation is still running when control/shutdown says suspend.
    const created = tpm2(port, 'tpm2_createprimary', '-C', 'o', '-G', 'rsa2048', '-c', join(work, 'p42.ctx'));
    await new Promise((r) => setTimeout(r, 30));
    await vtpm('guest', 'suspend', '--run', runDir, '--domid', '42');
    // Answered (created, or cancelled past the backend's bound): either way tpm2-tools got its answer.
    await created.then(
      (r) => expect(r.stdout).toMatch(/name-alg/),
      (e: { stderr?: string }) => expect(e.stderr ?? '').toMatch(/0x909|cancel/i),
    );
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '42');
    expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '42');
  }, 90_000);

  it('a guest suspends itself by writing its own control/shutdown (xenstore-write on its own connection)', async () => {
    const port = await attachStarted(43, randomUUID());
    await tpm2(port, 'tpm2_pcrextend', `16:sha256=${DIGEST}`);
    const before = await pcr16(port);
    const rd = new RunDir(runDir);
    const sock = join(rd.readHost().domainSocketDir, 'dom43.sock');
    await run('xenstore-write', ['/local/domain/43/control/shutdown', 'suspend'], { env: { ...process.env, XENSTORED_PATH: sock }, timeout: 10_000 });
    await waitFor('dom43 to save its suspended state', () => rd.readGuest(43)?.suspended === true);
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '43');
    expect(await pcr16(port)).toBe(before);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '43');
  }, 90_000);
});

describe('v2 guest: faults recover or refuse, never hang', () => {
  it('a v2 guest killed with -9 is resumed by guest resume, its vTPM state kept', async () => {
    const port = await attachStarted(44, randomUUID());
    await tpm2(port, 'tpm2_pcrextend', `16:sha256=${DIGEST}`);
    const before = await pcr16(port);
    const g = new RunDir(runDir).readGuest(44)!;
    process.kill(g.pid, 'SIGKILL');
    await waitFor('the guest to die', () => {
      try {
        process.kill(g.pid, 0);
        return false;
      } catch {
        return true;
      }
    });
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '44');
    expect(await pcr16(port)).toBe(before);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '44');
  }, 90_000);

  it('after the backend is killed and restarted, tpm2-tools through a v2 guest work again (new page, TPM started again)', async () => {
    const port = await attachStarted(45, randomUUID());
    await tpm2(port, 'tpm2_pcrextend', `16:sha256=${DIGEST}`);
    await tpm2(port, 'tpm2_nvdefine', '0x1500045', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite');
    const be = new RunDir(runDir).readHost().processes.find((p) => p.role === 'backend')!;
    process.kill(be.pid, 'SIGKILL');
    await restartDaemon(runDir, 'backend');
    expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
    // v2 has no per-command checkpoint: the volatile state (PCRs) died with the backend, NV did not.
    expect(await pcr16(port)).toBe('0'.repeat(64));
    expect((await tpm2(port, 'tpm2_nvreadpublic', '0x1500045')).stdout).toMatch(/0x1500045/);
    const log = fs.readFileSync(new RunDir(runDir).log('guest-45'), 'utf8');
    expect(log).toMatch(/backend replaced; reconnecting with a new page/);
    expect(log).toMatch(/lost its volatile state with the backend; started again/);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '45');
  }, 90_000);
});

describe('v2 guest: a command caught by a backend death', () => {
  it('is answered TPM_RC_FAILURE as soon as the restarted backend takes the device over, and the next command works', async () => {
    const port = await attachStarted(54, randomUUID());
    const be = new RunDir(runDir).readHost().processes.find((p) => p.role === 'backend')!;
    // A stopped backend never answers: the command sits on the page (SUBMIT) when the backend dies.
    process.kill(be.pid, 'SIGSTOP');
    const caught = tpm2(port, 'tpm2_getrandom', '8', '--hex').then(
      () => 'answered',
      (e: { stderr?: string }) => e.stderr ?? '',
    );
    await new Promise((r) => setTimeout(r, 500));
    process.kill(be.pid, 'SIGKILL');
    process.kill(be.pid, 'SIGCONT');
    const t0 = Date.now();
    await restartDaemon(runDir, 'backend');
    // Not resent (it may have run): a TPM failure answer, long before the 120 s command bound.
    expect(await caught).toMatch(/0x101|TPM_RC_FAILURE|failure/i);
    expect(Date.now() - t0).toBeLessThan(20_000);
    expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '54');
  }, 90_000);
});

describe('a guest starts its TPM at boot, as Linux does', () => {
  for (const protocol of ['v2', 'ring'] as const) {
    it(`${protocol}: tpm2_getrandom works on a freshly attached guest without tpm2_startup, and after a host restart`, async () => {
      const vm = randomUUID();
      const domid = protocol === 'v2' ? 46 : 47;
      let port = await attach(domid, vm, '--protocol', protocol);
      expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
      expect(fs.readFileSync(new RunDir(runDir).log(`guest-${domid}`), 'utf8')).toMatch(/TPM 2\.0 started \(Startup CLEAR\)/);
      await vtpm('guest', 'detach', '--run', runDir, '--domid', String(domid));
      await vtpm('host', 'down', '--run', runDir);
      await vtpm('host', 'up', '--run', runDir, '--state', stateDir);
      port = await attach(domid, vm, '--protocol', protocol);
      expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
      await vtpm('guest', 'detach', '--run', runDir, '--domid', String(domid));
    }, 120_000);
  }

  it('a TPM 1.2 guest is started with TPM_Startup(ST_CLEAR) after TPM_INVALID_POSTINIT; resume does not start it again', async () => {
    await attach(53, randomUUID(), '--tpm-version', '1.2');
    const log = () => fs.readFileSync(new RunDir(runDir).log('guest-53'), 'utf8');
    expect(log()).toMatch(/TPM 1\.2 started \(Startup CLEAR\)/);
    await vtpm('guest', 'suspend', '--run', runDir, '--domid', '53');
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '53');
    expect(log().match(/TPM 1\.2 started/g)?.length).toBe(1);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '53');
  }, 60_000);

  it('guest attach --no-startup leaves the TPM unstarted (TPM_RC_INITIALIZE)', async () => {
    const port = await attach(48, randomUUID(), '--no-startup');
    await expect(tpm2(port, 'tpm2_getrandom', '8', '--hex')).rejects.toThrow(/not initialized|0x100/i);
    await tpm2(port, 'tpm2_startup', '-c');
    expect((await tpm2(port, 'tpm2_getrandom', '8', '--hex')).stdout).toMatch(/^[0-9a-f]{16}$/);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '48');
  }, 60_000);
});

describe("a new VM's vTPM looks just manufactured", () => {
  it('after the spare waited 12 s: tpm2_readclock shows time and clock near 0, and PolicyCounterTimer --ult 10000 (and 60000) holds', async () => {
    // The backend keeps one spare TPM, made again right after the last attach took one: let it age.
    await new Promise((r) => setTimeout(r, 12_000));
    const port = await attachStarted(52, randomUUID());
    const { stdout } = await tpm2(port, 'tpm2_readclock');
    const time = Number(/time: ([0-9]+)/.exec(stdout)![1]);
    const clock = Number(/clock: ([0-9]+)/.exec(stdout)![1]);
    expect(time).toBeLessThan(10_000);
    expect(clock).toBeLessThan(10_000);
    expect(stdout).toMatch(/restart_count: 0/);
    // tpm2-tools' own abrmd_policycountertimer idea: a policy session on "time < bound" succeeds.
    for (const bound of ['10000', '60000']) {
      const ctx = join(work, `pct-${bound}.ctx`);
      await tpm2(port, 'tpm2_startauthsession', '--policy-session', '-S', ctx);
      await tpm2(port, 'tpm2_policycountertimer', '-S', ctx, '--ult', bound);
      await tpm2(port, 'tpm2_flushcontext', ctx);
    }
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '52');
  }, 60_000);
});

describe('the v2 page carries 4088 bytes', () => {
  /** A TPM2_GetRandom header claiming `size` bytes, padded to that size (what tpm2_send sends as is). */
  function bigCommand(size: number): Buffer {
    const b = Buffer.alloc(size);
    b.writeUInt16BE(0x8001, 0);
    b.writeUInt32BE(size, 2);
    b.writeUInt32BE(0x17b, 6);
    b.writeUInt16BE(8, 10);
    return b;
  }
  const send = async (port: number, cmd: Buffer): Promise<Buffer> => {
    const file = join(work, `cmd-${cmd.length}.bin`);
    const out = join(work, `rsp-${cmd.length}.bin`);
    fs.writeFileSync(file, cmd);
    await run('bash', ['-c', `tpm2_send -o ${out} < ${file}`], { env: tctiEnv(port), timeout: 20_000 });
    return fs.readFileSync(out);
  };

  it('commands of 4089..4096 bytes get TPM_RC_COMMAND_SIZE (0x142), not TPM_RC_FAILURE; 4088 reaches the TPM', async () => {
    const port = await attachStarted(49, randomUUID());
    for (const size of [4089, 4090, 4096]) {
      const rsp = await send(port, bigCommand(size));
      // Bytes: tag 8001, size 0000000a, rc 00000142.
      expect(rsp.toString('hex'), `${size} bytes`).toBe('80010000000a00000142');
    }
    // 4088 bytes fit the page: the TPM itself judges the command (GetRandom with trailing bytes).
    const rc = (await send(port, bigCommand(4088))).readUInt32BE(6);
    expect([0x142, 0x95, 0x1d5]).toContain(rc & 0xfff);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '49');
  }, 60_000);

  it('GetCapability through a v2 device promises at most 4088 for MAX_COMMAND_SIZE and MAX_RESPONSE_SIZE; the ring keeps 4096', async () => {
    const props = async (port: number): Promise<Record<string, number>> => {
      const { stdout } = await tpm2(port, 'tpm2_getcap', 'properties-fixed');
      const get = (name: string): number => Number(new RegExp(`${name}:\\s*\\n?\\s*raw: (0x[0-9A-F]+)`, 'i').exec(stdout)![1]);
      return { cmd: get('TPM2_PT_MAX_COMMAND_SIZE'), rsp: get('TPM2_PT_MAX_RESPONSE_SIZE') };
    };
    const v2 = await attachStarted(50, randomUUID());
    expect(await props(v2)).toEqual({ cmd: 4088, rsp: 4088 });
    const ring = await attachStarted(51, randomUUID(), '--protocol', 'ring');
    expect(await props(ring)).toEqual({ cmd: 4096, rsp: 4096 });
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '50');
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '51');
  }, 60_000);
});
