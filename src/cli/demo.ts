// `vtpm demo` (what `npm start` runs): a host with four guests. Each guest measures its boot stages
// into PCR 8, seals a disk key to the PCR value a clean boot gives, unseals it, and proves its PCRs with
// a quote verified against its own attestation key. One guest boots a tampered kernel: its quote still
// verifies (the TPM reports honestly) but its disk key stays sealed.
import type { Command } from 'commander';
import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { hostDown, hostUp } from './host.js';
import { guestAttach } from './guest.js';
import { freePortPair } from './ports.js';

const run = promisify(execFile);

const STAGES = ['firmware', 'bootloader', 'kernel', 'initrd'] as const;
const PCR = 8;

function stageImage(stage: string, tampered: boolean): Buffer {
  return Buffer.from(`${stage} image v1.0${tampered && stage === 'kernel' ? ' + rootkit' : ''}`);
}

/** The PCR 8 value a clean boot produces: the SHA-256 extend chain from 32 zero bytes. */
function goldenPcr(): Buffer {
  let pcr = Buffer.alloc(32);
  for (const s of STAGES) pcr = createHash('sha256').update(pcr).update(createHash('sha256').update(stageImage(s, false)).digest()).digest();
  return pcr;
}

interface GuestResult {
  domid: number;
  tampered: boolean;
  pcr8: string;
  unsealed: boolean;
  quoteVerified: boolean;
  ms: number;
}

async function guestScenario(domid: number, port: number, tampered: boolean, work: string): Promise<GuestResult> {
  const t0 = Date.now();
  const env = { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` };
  const dir = join(work, `dom${domid}`);
  fs.mkdirSync(dir, { recursive: true });
  const f = (n: string): string => join(dir, n);
  // No resource manager sits between tpm2-tools and the vTPM (as with swtpm), so each step flushes
  // the transient objects and sessions it leaves behind: a TPM holds only three.
  const tpm = async (tool: string, ...args: string[]): Promise<{ stdout: string; stderr: string }> => {
    const out = await run(`tpm2_${tool}`, args, { env });
    if (tool !== 'flushcontext' && tool !== 'startup' && tool !== 'pcrextend' && tool !== 'pcrread') {
      await run('tpm2_flushcontext', ['-t'], { env });
      await run('tpm2_flushcontext', ['-s'], { env });
    }
    return out;
  };
  await tpm('startup', '-c');
  // Measured boot: each stage is hashed and extended into PCR 8 before it runs.
  for (const s of STAGES) {
    const digest = createHash('sha256').update(stageImage(s, tampered)).digest('hex');
    await tpm('pcrextend', `${PCR}:sha256=${digest}`);
  }
  const pcrOut = (await tpm('pcrread', `sha256:${PCR}`)).stdout;
  const pcr8 = /0x([0-9A-Fa-f]{64})/.exec(pcrOut)?.[1]?.toLowerCase() ?? '?';
  // Seal a disk key to the value a clean boot gives (the policy is computed, not read from this TPM).
  fs.writeFileSync(f('golden.pcr'), goldenPcr());
  const diskKey = randomBytes(32);
  fs.writeFileSync(f('disk.key'), diskKey);
  await tpm('createprimary', '-C', 'o', '-g', 'sha256', '-G', 'ecc', '-c', f('primary.ctx'));
  await tpm('createpolicy', '--policy-pcr', '-l', `sha256:${PCR}`, '-f', f('golden.pcr'), '-L', f('policy.dat'));
  await tpm('create', '-C', f('primary.ctx'), '-L', f('policy.dat'), '-i', f('disk.key'), '-u', f('seal.pub'), '-r', f('seal.priv'));
  await tpm('load', '-C', f('primary.ctx'), '-u', f('seal.pub'), '-r', f('seal.priv'), '-c', f('seal.ctx'));
  let unsealed = false;
  try {
    await tpm('unseal', '-c', f('seal.ctx'), '-p', `pcr:sha256:${PCR}`, '-o', f('unsealed.key'));
    unsealed = fs.readFileSync(f('unsealed.key')).equals(diskKey);
  } catch {
    unsealed = false; // PolicyPCR does not match: the TPM refuses
    await run('tpm2_flushcontext', ['-t'], { env });
    await run('tpm2_flushcontext', ['-s'], { env });
  }
  // Attestation: a restricted signing key quotes PCR 8 over a fresh nonce; verify with its public key.
  await tpm('createprimary', '-C', 'o', '-g', 'sha256', '-G', 'ecc256:ecdsa-sha256:null', '-a',
    'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign', '-c', f('ak.ctx'));
  await tpm('readpublic', '-c', f('ak.ctx'), '-f', 'pem', '-o', f('ak.pem'));
  const nonce = randomBytes(16).toString('hex');
  await tpm('quote', '-c', f('ak.ctx'), '-l', `sha256:${PCR}`, '-q', nonce, '-m', f('quote.msg'), '-s', f('quote.sig'), '-o', f('quote.pcrs'), '-g', 'sha256');
  let quoteVerified = false;
  try {
    await run('tpm2_checkquote', ['-u', f('ak.pem'), '-m', f('quote.msg'), '-s', f('quote.sig'), '-f', f('quote.pcrs'), '-g', 'sha256', '-q', nonce]);
    quoteVerified = true;
  } catch {
    quoteVerified = false;
  }
  return { domid, tampered, pcr8, unsealed, quoteVerified, ms: Date.now() - t0 };
}

export async function demo(opts: { guests?: number; keep?: boolean } = {}): Promise<boolean> {
  const n = opts.guests ?? 4;
  const work = fs.mkdtempSync(join(os.tmpdir(), 'vtpm-demo-'));
  const runDir = join(work, 'run');
  const stateDir = join(work, 'state');
  const t0 = Date.now();
  console.log(`run dir ${runDir}`);
  const h = await hostUp(runDir, stateDir, 'single');
  console.log(`host up: ${h.processes.map((p) => `${p.role} pid ${p.pid}`).join(', ')} (${Date.now() - t0} ms)`);
  let ok = false;
  try {
    const guests: Array<{ domid: number; port: number }> = [];
    for (let i = 1; i <= n; i++) {
      const port = await freePortPair();
      const g = await guestAttach({ run: runDir, domid: i, vm: randomUUID(), protocol: i % 2 ? 'v2' : 'ring', tctiPort: port });
      console.log(`dom${i} attached over ${g.protocol}, tpm2-tools on port ${port}`);
      guests.push({ domid: i, port });
    }
    const results = await Promise.all(guests.map((g) => guestScenario(g.domid, g.port, g.domid === n, work)));
    const golden = goldenPcr().toString('hex');
    console.log('');
    console.log('guest  kernel    PCR 8             unseal disk key  quote verified  time');
    for (const r of results) {
      console.log(
        `dom${r.domid}   ${(r.tampered ? 'TAMPERED' : 'clean').padEnd(8)}  ${r.pcr8.slice(0, 16)}  ${(r.unsealed ? 'yes' : 'REFUSED').padEnd(15)}  ${(r.quoteVerified ? 'yes' : 'NO').padEnd(14)}  ${r.ms} ms`,
      );
    }
    console.log(`\ngolden PCR 8 (clean boot): ${golden.slice(0, 16)}…`);
    ok = results.every((r) => r.quoteVerified && r.unsealed === !r.tampered && (r.pcr8 === golden) === !r.tampered);
    console.log(ok ? 'as expected: clean guests unseal, the tampered one cannot; every quote verifies' : 'UNEXPECTED RESULT');
  } finally {
    await hostDown(runDir);
    console.log(`host down (${((Date.now() - t0) / 1000).toFixed(1)} s in all)`);
    if (!opts.keep) fs.rmSync(work, { recursive: true, force: true });
  }
  return ok;
}

export function register(program: Command): void {
  program
    .command('demo')
    .description('host up, four guests: measured boot, seal/unseal, quote; one tampered guest; host down')
    .option('--guests <n>', 'number of guests (the last one is tampered)', (v) => Number(v), 4)
    .option('--keep', 'keep the temp directory (run dir, logs, state)')
    .action(async (o: { guests: number; keep?: boolean }) => {
      if (!(await demo(o))) process.exitCode = 1;
    });
}
