// A multi-VM vTPM domain (docs/multi-vm.md): one guest's TPM alone in a process with its own
// domid and its own FIFO pair to the manager (bound to its instance, so it can only SAVENVM/LOADNVM its
// own state). TPM commands arrive over a shared-memory ring whose pages the backend (dom0, the ring's
// frontend) granted to this domid: this process is that ring's backend (RingChannel), exactly as the
// backend is for a guest, and serves it through the same exactly-once session (ExactlyOnce), its table
// travelling in the domain's volatile checkpoints. Lifecycle (READY, STOP, Startup, SAVE_VOLATILE,
// HEALTH, state blobs) stays on the domain frames over stdin/stdout (src/tpm/domain-protocol.ts), the
// way a toolstack, not the guest, drives a stub domain. The domain registers itself in --register-dir
// while it runs. This is the only entry point of a vTPM-domain process.
//
//   node dist/src/backend/vtpm-domain-main.js --instance N --domid D --tpm-version 2.0 --vm UUID
//     --manager-run DIR --xen-dir DIR --ring-ref R --event-channel P [--front-domid 0] [--register-dir DIR]
import fs from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { Domain } from '../xen/index.js';
import { ManagerClient } from '../manager/client.js';
import { inheritedPair } from '../manager/fifo-client.js';
import { runDomain, stdioTransport } from '../tpm/domain.js';
import type { TpmInstance } from '../tpm/instance.js';
import { RingChannel } from './ring-channel.js';
import { JournalStore } from './journal.js';
import { ExactlyOnce } from './exactly-once.js';
import { escapeLogLine } from '../util/log-escape.js';
import { collectAfterStartup } from '../util/heap.js';

export interface RingDomainArgs {
  instance: number;
  domid: number;
  version: '2.0' | '1.2';
  vm: string;
  managerRunDir: string;
  xenDir: string;
  frontDomid: number;
  ringRef: number;
  eventChannel: number;
  registerDir?: string;
  /** Request write end and response read end of a manager pair the backend attached (under isolation). */
  managerFds?: [number, number];
}

export function parseRingDomainArgs(argv: string[]): RingDomainArgs {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      instance: { type: 'string' },
      domid: { type: 'string' },
      'tpm-version': { type: 'string', default: '2.0' },
      vm: { type: 'string', default: '' },
      'manager-run': { type: 'string' },
      'xen-dir': { type: 'string' },
      'front-domid': { type: 'string', default: '0' },
      'ring-ref': { type: 'string' },
      'event-channel': { type: 'string' },
      'register-dir': { type: 'string' },
      'manager-fds': { type: 'string' },
    },
    strict: true,
  });
  const int = (name: string, s: string | undefined, min: number, max: number): number => {
    const n = Number(s);
    if (s === undefined || !Number.isInteger(n) || n < min || n > max) throw new Error(`--${name} must be an integer ${min}..${max}`);
    return n;
  };
  const version = v['tpm-version'];
  if (version !== '2.0' && version !== '1.2') throw new Error('--tpm-version must be 2.0 or 1.2');
  if (!v['manager-run']) throw new Error('--manager-run is required');
  if (!v['xen-dir']) throw new Error('--xen-dir is required');
  const fds = v['manager-fds']?.split(',').map(Number);
  if (fds && !(fds.length === 2 && fds.every((n) => Number.isInteger(n) && n >= 3))) throw new Error('--manager-fds takes REQ,RSP descriptor numbers (3 or more)');
  return {
    instance: int('instance', v.instance, 0, 0xffffffff),
    domid: int('domid', v.domid, 1, 0x7fef),
    version,
    vm: v.vm ?? '',
    managerRunDir: v['manager-run'],
    xenDir: v['xen-dir'],
    frontDomid: int('front-domid', v['front-domid'], 0, 0x7fef),
    ringRef: int('ring-ref', v['ring-ref'], 0, 0xffffffff),
    eventChannel: int('event-channel', v['event-channel'], 1, 255),
    registerDir: v['register-dir'],
    ...(fds ? { managerFds: [fds[0]!, fds[1]!] as [number, number] } : {}),
  };
}

const log = (l: string): void => void process.stderr.write(`${new Date().toISOString()} ${escapeLogLine(l)}\n`);

/** Run the domain until STOP or until stdin closes; resolves with the exit code. */
export async function ringDomainMain(a: RingDomainArgs): Promise<number> {
  const dom = await Domain.create({ domid: a.domid, dir: a.xenDir });
  const regFile = a.registerDir ? join(a.registerDir, `dom${a.domid}.json`) : null;
  let channel: RingChannel | null = null;
  let mgr: ManagerClient | null = null;
  try {
    const name = `vtpm-domain-${a.domid}`;
    mgr = a.managerFds
      ? ManagerClient.adopt(inheritedPair(name, a.managerFds[0], a.managerFds[1]))
      : await ManagerClient.connect(a.managerRunDir, { bind: a.instance, name });
    // The exactly-once table rides in the volatile blobs this domain stores at the manager.
    const journal = new JournalStore(mgr, a.instance);
    const attach = async (inst: TpmInstance): Promise<void> => {
      const session = new ExactlyOnce(inst, journal, log);
      await session.restore();
      channel = new RingChannel(dom, {
        frontDomid: a.frontDomid,
        refs: [a.ringRef],
        port: a.eventChannel,
        target: session,
        // A ring that lies about its indices cannot be trusted again: stop (state durable), so the
        // backend sees the exit at once and starts a fresh domain on a fresh ring.
        onFatal: (reason) => {
          log(`vtpm-domain ${a.domid}: ring from dom${a.frontDomid} broken: ${reason}; stopping`);
          process.stdin.destroy();
        },
        log,
      });
      if (regFile) {
        fs.mkdirSync(a.registerDir!, { recursive: true });
        const entry = { role: 'vtpm-domain', domid: a.domid, pid: process.pid, instance: a.instance, vm: a.vm, version: a.version };
        fs.writeFileSync(`${regFile}.tmp`, JSON.stringify(entry) + '\n');
        fs.renameSync(`${regFile}.tmp`, regFile);
      }
      collectAfterStartup();
    };
    // Alone in this process, a constant-time command run inline delays no other guest, and saves the
    // thread-pool round trip that would otherwise dominate GetRandom / PCR_Extend.
    return await runDomain({ instance: a.instance, domid: a.domid, version: a.version, store: journal, transport: stdioTransport(), inline: 'fast', onInstance: attach });
  } finally {
    if (regFile) fs.rmSync(regFile, { force: true });
    (channel as RingChannel | null)?.close();
    mgr?.disconnect();
    await dom.destroy();
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  // SIGTERM/SIGINT end the domain like the backend closing its control pipe: power off, state durable.
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => process.stdin.destroy());
  ringDomainMain(parseRingDomainArgs(process.argv.slice(2))).then(
    (code) => process.exit(code),
    (err: unknown) => {
      log(`vtpm-domain: ${err instanceof Error ? err.message : String(err)}`);
      process.exit(1);
    },
  );
}
