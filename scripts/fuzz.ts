// `npm run fuzz [-- --inputs N] [--seed S] [--rounds R] [--json]`: generated hostile inputs against a
// live host (docs/fuzzing.md). It starts a host (hypervisor, xenstored, manager, backend), two good
// guests and a QEMU endpoint, then sends batches from five raw peers: a guest's xs_wire connection, a client
// FIFO pair of the manager, the QEMU endpoint's control socket, and guest domains scribbling on their
// v2 page and ring slots. Between batches it checks that the daemons still run under their first pids,
// that the good guests' commands complete within 2 s, and how much the daemons grew. A run is
// reproduced by its seed; the exit status is 0 only if nothing restarted and every check passed.
// koffi settings first: they cannot change once any native library is loaded
import '../native/koffi-config.js';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { freePortPair } from '../src/cli/ports.js';
import { XsClient } from '../src/xenstore/client.js';
import { ManagerClient } from '../src/manager/client.js';
import { Rng, targetSeed } from './fuzz/gen.js';
import { CtrlTarget, GuestTarget, ManagerTarget, XsTarget, type Target, type TargetStats } from './fuzz/targets.js';

const run = promisify(execFile);
const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const vtpm = (...args: string[]) => run(process.execPath, [MAIN, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1' } });

export interface FuzzOptions {
  inputs: number;
  seed: number;
  rounds: number;
  log: (line: string) => void;
}

export interface FuzzSummary {
  seed: number;
  seconds: number;
  targets: Record<string, TargetStats>;
  totalInputs: number;
  /** Daemons no longer running under the pid they started with (must be 0). */
  restarts: number;
  rssMiB: Record<string, { start: number; end: number; max: number }>;
  liveness: { checks: number; failures: string[]; slowestMs: number };
}

/** Each target's share of the inputs (the guest targets are slower per input). */
const SHARES: Record<string, number> = { xs_wire: 0.35, 'swtpm ctrl': 0.2, 'manager frames': 0.15, 'v2 page': 0.12, 'ring slots': 0.18 };

function rssMiB(pid: number): number {
  try {
    return Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;
  } catch {
    return 0;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => (t = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms)))]).finally(() =>
    clearTimeout(t),
  );
}

/** One raw TPM command over a TCTI bridge's data port (swtpm's TCP protocol), answered by its size. */
async function tctiCommand(port: number, cmd: Buffer): Promise<Buffer> {
  const s = net.createConnection({ host: '127.0.0.1', port });
  try {
    let buf = Buffer.alloc(0);
    return await new Promise<Buffer>((resolve, reject) => {
      s.on('error', reject);
      s.on('close', () => reject(new Error('closed')));
      s.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.length >= 10 && buf.length >= buf.readUInt32BE(2)) resolve(buf);
      });
      s.write(cmd);
    });
  } finally {
    s.destroy();
  }
}

const GET_RANDOM_8 = Buffer.from('80010000000c0000017b0008', 'hex');
const STARTUP_CLEAR = Buffer.from('80010000000c000001440000', 'hex');

export async function fuzz(o: FuzzOptions): Promise<FuzzSummary> {
  const t0 = Date.now();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-fuzz-'));
  const runDir = path.join(work, 'run');
  const targets: Target[] = [];
  let dom0: XsClient | undefined;
  try {
    await vtpm('host', 'up', '--run', runDir, '--state', path.join(work, 'state'));
    const host = JSON.parse(fs.readFileSync(path.join(runDir, 'host.json'), 'utf8')) as {
      xenDir: string;
      xenstoredSocket: string;
      domainSocketDir: string;
      managerRunDir: string;
      processes: Array<{ role: string; pid: number }>;
    };
    const daemons = host.processes.filter((p) => ['hypervisor', 'xenstored', 'manager', 'backend'].includes(p.role));
    const good: number[] = [];
    for (const [domid, protocol] of [
      [1, 'v2'],
      [2, 'ring'],
    ] as const) {
      const port = await freePortPair();
      await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', randomUUID(), '--protocol', protocol, '--tcti-port', String(port));
      await tctiCommand(port, STARTUP_CLEAR);
      good.push(port);
    }
    const ctrl = path.join(work, 'ctrl.sock');
    await vtpm('qemu', 'attach', '--run', runDir, '--vm', randomUUID(), '--ctrl', ctrl);
    dom0 = await XsClient.connect(host.xenstoredSocket);
    const xsDomid = 300;
    await dom0.introduce(xsDomid);
    const rng = (name: string) => new Rng(targetSeed(o.seed, name));
    targets.push(new XsTarget(path.join(host.domainSocketDir, `dom${xsDomid}.sock`), xsDomid, rng('xs_wire')));
    targets.push(new CtrlTarget(ctrl, rng('swtpm ctrl')));
    targets.push(new ManagerTarget(host.managerRunDir, randomUUID(), rng('manager frames')));
    const g = { xenDir: host.xenDir, domainSocketDir: host.domainSocketDir, dom0 };
    targets.push(await GuestTarget.create({ ...g, domid: 301, protocol: 'v2', vm: randomUUID(), r: rng('v2 page') }));
    targets.push(await GuestTarget.create({ ...g, domid: 302, protocol: 'ring', vm: randomUUID(), r: rng('ring slots') }));

    const rss: FuzzSummary['rssMiB'] = {};
    for (const d of daemons) {
      const v = rssMiB(d.pid);
      rss[d.role] = { start: v, end: v, max: v };
    }
    const liveness: FuzzSummary['liveness'] = { checks: 0, failures: [], slowestMs: 0 };
    const check = async (after: string): Promise<void> => {
      liveness.checks++;
      const timed = async (what: string, p: () => Promise<unknown>): Promise<void> => {
        const s = Date.now();
        try {
          await withTimeout(p(), 2000, what);
        } catch (err) {
          liveness.failures.push(`after ${after}: ${(err as Error).message}`);
        }
        liveness.slowestMs = Math.max(liveness.slowestMs, Date.now() - s);
      };
      for (const port of good) {
        await timed(`good guest on port ${port}`, async () => {
          const rsp = await tctiCommand(port, GET_RANDOM_8);
          if (rsp.readUInt32BE(6) !== 0) throw new Error(`good guest on port ${port}: GetRandom answered 0x${rsp.readUInt32BE(6).toString(16)}`);
        });
      }
      await timed('xenstored', () => dom0!.directory('/local/domain'));
      await timed('QEMU endpoint', () => ctrlGetCapability(ctrl));
      await timed('manager', async () => (await ManagerClient.connect(host.managerRunDir, { name: `fuzz-live-${liveness.checks}` })).disconnect());
      for (const d of daemons) {
        if (!alive(d.pid)) liveness.failures.push(`after ${after}: ${d.role} (pid ${d.pid}) is gone`);
        const v = rssMiB(d.pid);
        rss[d.role]!.end = v;
        rss[d.role]!.max = Math.max(rss[d.role]!.max, v);
      }
    };

    await check('start');
    for (let round = 0; round < o.rounds; round++) {
      for (const t of targets) {
        const want = Math.ceil((o.inputs * (SHARES[t.name] ?? 0.2)) / o.rounds);
        await t.batch(want);
        await check(`${t.name} batch ${round + 1}`);
      }
      o.log(`round ${round + 1}/${o.rounds}: ${targets.map((t) => `${t.name} ${t.stats.inputs}`).join(', ')}`);
    }
    const restarts = daemons.filter((d) => !alive(d.pid)).length;
    for (const t of targets) {
      if (t.stats.attachFailures) liveness.failures.push(`${t.name}: could not attach again ${t.stats.attachFailures} times${t instanceof ManagerTarget && t.lastError ? ` (${t.lastError})` : ''}`);
    }
    const stats = Object.fromEntries(targets.map((t) => [t.name, { ...t.stats }]));
    return {
      seed: o.seed,
      seconds: Math.round((Date.now() - t0) / 100) / 10,
      targets: stats,
      totalInputs: targets.reduce((n, t) => n + t.stats.inputs, 0),
      restarts,
      rssMiB: Object.fromEntries(Object.entries(rss).map(([k, v]) => [k, { start: round1(v.start), end: round1(v.end), max: round1(v.max) }])),
      liveness,
    };
  } catch (err) {
    // the daemons' side of what went wrong
    const tail = (role: string): string => {
      try {
        return fs.readFileSync(path.join(runDir, 'logs', `${role}.log`), 'utf8').split('\n').slice(-15).join('\n');
      } catch {
        return '';
      }
    };
    throw new Error(`${(err as Error).message}\n--- backend.log ---\n${tail('backend')}\n--- xenstored.log ---\n${tail('xenstored')}`);
  } finally {
    for (const t of targets) await t.close().catch(() => {});
    await dom0?.close().catch(() => {});
    await vtpm('host', 'down', '--run', runDir).catch(() => {});
    fs.rmSync(work, { recursive: true, force: true });
  }
}

function round1(x: number): number {
  return Math.round(x * 10) / 10;
}

/** CMD_GET_CAPABILITY on a fresh control connection. */
function ctrlGetCapability(p: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(p, () => s.write(Buffer.from('00000001', 'hex')));
    s.on('error', reject);
    s.on('data', (d: Buffer) => {
      s.destroy();
      if (d.length >= 4 && d.readUInt32BE(0) === 0) resolve();
      else reject(new Error(`QEMU endpoint: GET_CAPABILITY answered ${d.toString('hex')}`));
    });
  });
}

export function formatSummary(s: FuzzSummary): string {
  const lines = [`fuzz: seed ${s.seed}, ${s.totalInputs} inputs in ${s.seconds} s`, 'target           inputs  cut off  unanswered  own ring overwritten'];
  for (const [name, t] of Object.entries(s.targets)) {
    const own = name === 'ring slots' ? String(t.ownRingOverwritten).padStart(21) : '';
    lines.push(`${name.padEnd(15)} ${String(t.inputs).padStart(7)} ${String(t.cutOffs).padStart(8)} ${String(t.unanswered).padStart(11)} ${own}`.trimEnd());
  }
  lines.push(`daemon restarts: ${s.restarts}`);
  for (const [role, r] of Object.entries(s.rssMiB)) lines.push(`${role.padEnd(10)} RSS ${r.start} -> ${r.end} MiB (max ${r.max}, growth ${round1(r.max - r.start)})`);
  lines.push(`liveness checks: ${s.liveness.checks}, failures: ${s.liveness.failures.length}, slowest ${s.liveness.slowestMs} ms`);
  for (const f of s.liveness.failures.slice(0, 20)) lines.push(`  ${f}`);
  return lines.join('\n');
}

async function main(argv: string[]): Promise<number> {
  const o: FuzzOptions = { inputs: 100_000, seed: (Date.now() ^ process.pid) >>> 0, rounds: 10, log: (l) => console.error(`fuzz: ${l}`) };
  let json = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const num = (): number => {
      const v = Number(argv[++i]);
      if (!Number.isInteger(v) || v < 0) throw new Error(`${a} takes a non-negative integer`);
      return v;
    };
    if (a === '--inputs') o.inputs = num();
    else if (a === '--seed') o.seed = num() >>> 0;
    else if (a === '--rounds') o.rounds = Math.max(1, num());
    else if (a === '--json') json = true;
    else throw new Error(`unknown option ${a} (--inputs N, --seed S, --rounds R, --json)`);
  }
  o.log(`seed ${o.seed}, ${o.inputs} inputs in ${o.rounds} rounds`);
  const s = await fuzz(o);
  console.log(json ? JSON.stringify(s, null, 2) : formatSummary(s));
  return s.restarts === 0 && s.liveness.failures.length === 0 ? 0 : 1;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(`fuzz: ${err instanceof Error ? err.message : String(err)}`);
      process.exit(2);
    },
  );
}
