// A vTPM stub domain (docs/multi-vm.md, stubdom): the Xen 4.x layout, where the domain that holds one
// guest's vTPM IS that guest's device backend. It connects to xenstore through its own socket (so it is
// domain D there, and reaches only its own home and the frontend directory the toolstack let it read),
// waits for the device the toolstack writes under /local/domain/D/backend/vtpm/<fe>/<devid>, and serves
// it with the backend code dom0 uses (BackendDevice, the v2 and ring channels) on an in-process libtpms
// instance whose state goes to the manager over this domain's own FIFO pair, bound to its instance.
// dom0 opened that instance at the manager (a privileged ordinal) and passes it here; it starts, stops
// and restarts this process over the vTPM-domain control frames on stdin/stdout (STOP, SAVE_VOLATILE,
// HEALTH), the way a toolstack drives a stub domain. Nothing the guest writes reaches that pipe.
//
//   node dist/src/backend/stubdom-main.js --instance N --domid D --front-domid F --devid 0 --vm UUID
//     --tpm-version 2.0 --xs-socket SOCK --xen-dir DIR (--manager-fds 4,5 | --manager-run DIR)
//     [--created] [--register-dir DIR]
import fs from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { Domain } from '../xen/index.js';
import { connect, type XsClient, type XsWatch } from '../xenstore/client.js';
import { vtpmDevice } from '../xenstore/xenbus.js';
import { ManagerClient } from '../manager/client.js';
import { inheritedPair } from '../manager/fifo-client.js';
import { TpmHost } from '../tpm/host.js';
import { DomainMsg, type DomainHealth, type Frame } from '../tpm/domain-protocol.js';
import { serveControl, stdioTransport } from '../tpm/domain.js';
import { BackendDevice } from './device.js';
import { ProviderError, type OpenMode, type VtpmProvider, type VtpmSession } from './provider.js';
import type { SwtpmVtpm } from '../tpm/vtpm.js';
import type { TpmVersion } from '../tpm/wire.js';
import { InProcessVtpms } from './single-vm.js';
import { escapeLogLine } from '../util/log-escape.js';
import { collectAfterStartup } from '../util/heap.js';

export interface StubdomArgs {
  instance: number;
  /** The manager's OPEN created this vTPM (dom0 passes it on the first start only). */
  created: boolean;
  domid: number;
  frontDomid: number;
  devid: number;
  vm: string;
  version: '2.0' | '1.2';
  xsSocket: string;
  xenDir: string;
  managerRunDir?: string;
  /** Request write end and response read end of the pair dom0 attached for this instance. */
  managerFds?: [number, number];
  registerDir?: string;
}

export class StubdomArgError extends Error {
  readonly code = 'USAGE';
}

export function parseStubdomArgs(argv: string[]): StubdomArgs {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      instance: { type: 'string' },
      created: { type: 'boolean', default: false },
      domid: { type: 'string' },
      'front-domid': { type: 'string' },
      devid: { type: 'string', default: '0' },
      vm: { type: 'string' },
      'tpm-version': { type: 'string', default: '2.0' },
      'xs-socket': { type: 'string' },
      'xen-dir': { type: 'string' },
      'manager-run': { type: 'string' },
      'manager-fds': { type: 'string' },
      'register-dir': { type: 'string' },
    },
    strict: true,
  });
  const int = (name: string, s: string | undefined, min: number, max: number): number => {
    const n = Number(s);
    if (s === undefined || !/^[0-9]+$/.test(s) || n < min || n > max) throw new StubdomArgError(`--${name} must be an integer ${min}..${max}, not ${s ?? 'missing'}`);
    return n;
  };
  const version = v['tpm-version'];
  if (version !== '2.0' && version !== '1.2') throw new StubdomArgError('--tpm-version must be 2.0 or 1.2');
  if (!v.vm) throw new StubdomArgError('--vm is required');
  if (!v['xs-socket']) throw new StubdomArgError('--xs-socket is required');
  if (!v['xen-dir']) throw new StubdomArgError('--xen-dir is required');
  const fds = v['manager-fds']?.split(',').map(Number);
  if (fds && !(fds.length === 2 && fds.every((n) => Number.isInteger(n) && n >= 3))) throw new StubdomArgError('--manager-fds takes REQ,RSP descriptor numbers (3 or more)');
  if (!fds && !v['manager-run']) throw new StubdomArgError('--manager-fds or --manager-run is required');
  return {
    instance: int('instance', v.instance, 0, 0xffffffff),
    created: v.created ?? false,
    domid: int('domid', v.domid, 1, 0x7fef),
    frontDomid: int('front-domid', v['front-domid'], 1, 0x7fef),
    devid: int('devid', v.devid, 0, 0xffff),
    vm: v.vm.toLowerCase(),
    version,
    xsSocket: v['xs-socket'],
    xenDir: v['xen-dir'],
    ...(v['manager-run'] ? { managerRunDir: v['manager-run'] } : {}),
    ...(fds ? { managerFds: [fds[0]!, fds[1]!] as [number, number] } : {}),
    ...(v['register-dir'] ? { registerDir: v['register-dir'] } : {}),
  };
}

// Its stderr is the backend's log: every line says which domain wrote it.
let who = 'vtpm-stubdom';
const log = (l: string): void => void process.stderr.write(`${new Date().toISOString()} ${who}: ${escapeLogLine(l)}\n`);

/** Run the stub domain until STOP or until its control pipe closes; resolves with the exit code. */
export async function stubdomMain(a: StubdomArgs): Promise<number> {
  const started = Date.now();
  who = `vtpm-stubdom ${a.domid}`;
  const dom = await Domain.create({ domid: a.domid, dir: a.xenDir });
  const name = `vtpm-stubdom-${a.domid}`;
  let xs: XsClient | null = null;
  let mgr: ManagerClient | null = null;
  let watch: XsWatch | null = null;
  let device: BackendDevice | null = null;
  const host = new TpmHost();
  const regFile = a.registerDir ? join(a.registerDir, `dom${a.domid}.json`) : null;
  try {
    mgr = a.managerFds
      ? ManagerClient.adopt(inheritedPair(name, a.managerFds[0], a.managerFds[1]))
      : await ManagerClient.connect(a.managerRunDir!, { bind: a.instance, name });
    xs = await connect(a.xsSocket);
    // The instance dom0 opened is the only vTPM here: no OPEN/CLOSE from this domain (they are the
    // console's), and a device naming another VM is refused by the provider.
    const inProcess = new InProcessVtpms(host, mgr, log, { instance: a.instance, created: a.created });
    // The TPM loads when the guest connects: collect what loading it left behind once it runs.
    const vtpms = new StubdomVtpms(inProcess, a.vm);
    const dev = vtpmDevice(a.frontDomid, a.devid, a.domid);
    const conn = xs;
    let starting: Promise<void> | null = null;
    // The toolstack writes the device after dom0 said which domid serves it: take it up once its
    // directory is complete (frontend written, online not 0), as tpmback's scan does.
    const pickUp = async (): Promise<void> => {
      if (device) return;
      if ((await conn.tryRead(`${dev.backend}/frontend`)) === undefined) return;
      if ((await conn.tryRead(`${dev.backend}/state`)) === undefined) return;
      if ((await conn.tryRead(`${dev.backend}/online`)) === '0' || device) return;
      device = new BackendDevice({
        dom,
        xs: conn,
        dev,
        vtpms,
        log,
        onGone: () => {
          log(`dom${a.frontDomid}: device ${a.devid} finished`);
          device = null;
        },
      });
      await device.start();
    };
    watch = await xs.watch(dev.backend, () => {
      starting = (starting ?? Promise.resolve()).then(pickUp).catch((err: unknown) => log(`${dev.backend}: ${(err as Error).message}`));
    });
    if (regFile) {
      const entry = { role: 'vtpm-domain', domid: a.domid, pid: process.pid, instance: a.instance, vm: a.vm, version: a.version, serves: a.frontDomid, layout: 'stubdom' };
      fs.writeFileSync(`${regFile}.tmp`, JSON.stringify(entry) + '\n');
      fs.renameSync(`${regFile}.tmp`, regFile);
    }
    const health = (): DomainHealth => ({
      instance: a.instance,
      domid: a.domid,
      pid: process.pid,
      version: a.version,
      status: device?.connected ? 'connected' : 'waiting',
      busy: false,
      rssKiB: Math.round(process.memoryUsage.rss() / 1024),
      uptimeMs: Date.now() - started,
    });
    collectAfterStartup();
    return await control(
      async (f) => {
        switch (f.type) {
          case DomainMsg.HEALTH:
            return new TextEncoder().encode(JSON.stringify(health()));
          case DomainMsg.SAVE_VOLATILE: {
            const inst = host.get(a.instance);
            if (inst && inst.status === 'running') await inst.saveVolatile();
            return new Uint8Array(0);
          }
          default:
            throw Object.assign(new Error(`message type 0x${f.type.toString(16)} is not served by a stub domain (its TPM is reached through its device)`), { code: 'BAD_REQUEST' });
        }
      },
      health,
      // STOP: answer what the guest has in flight, make the vTPM durable, leave the device to dom0.
      async () => {
        await watch?.close().catch(() => undefined);
        const d = device as BackendDevice | null;
        await d?.stop();
        await host.destroyAll().catch(() => undefined);
      },
    );
  } finally {
    if (regFile) fs.rmSync(regFile, { force: true });
    await watch?.close().catch(() => undefined);
    await host.destroyAll().catch(() => undefined);
    await xs?.close().catch(() => undefined);
    mgr?.disconnect();
    await dom.destroy();
  }
}

/** The domain's one vTPM, served to its device; a stub domain has no QEMU endpoint. */
class StubdomVtpmError extends Error {
  readonly code = 'OTHER_VM';
}

class StubdomVtpms implements VtpmProvider {
  #collected = false;
  constructor(
    readonly inner: InProcessVtpms,
    /** The VM whose vTPM dom0 opened for this domain, lower case. */
    readonly vm: string,
  ) {}
  open(vmUuid: string, version: TpmVersion, mode: { resume: boolean }): Promise<VtpmSession>;
  open(vmUuid: string, version: TpmVersion, mode: { qemu: true }): Promise<SwtpmVtpm>;
  async open(vmUuid: string, version: TpmVersion, mode: OpenMode): Promise<VtpmSession | SwtpmVtpm> {
    if ('qemu' in mode) throw new ProviderError('NO_QEMU', `a vTPM stub domain serves its guest's xenbus device only, not QEMU (VM ${vmUuid})`);
    if (vmUuid.toLowerCase() !== this.vm) throw new StubdomVtpmError(`this vTPM domain holds the vTPM of VM ${this.vm}, not ${vmUuid}`);
    const session = await this.inner.open(vmUuid, version, mode);
    // Start-up garbage goes once; a guest's later reconnects reopen the loaded vTPM and make none.
    if (!this.#collected) {
      this.#collected = true;
      collectAfterStartup();
    }
    return session;
  }
  release(instance: number): Promise<void> {
    return this.inner.release(instance);
  }
}

/** The control frames on stdin/stdout (src/tpm/domain-protocol.ts), served as every vTPM domain serves them. */
function control(handle: (f: Frame) => Promise<Uint8Array>, health: () => DomainHealth, stop: () => Promise<void>): Promise<number> {
  return serveControl(stdioTransport(), handle, health, () => stop().catch((err: unknown) => log(`stop: ${(err as Error).message}`)));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  // SIGTERM/SIGINT end the domain like dom0 closing its control pipe: answers given, state durable.
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => process.stdin.destroy());
  let args: StubdomArgs;
  try {
    args = parseStubdomArgs(process.argv.slice(2));
  } catch (err) {
    log((err as Error).message);
    process.exit(64);
  }
  stubdomMain(args).then(
    (code) => process.exit(code),
    (err: unknown) => {
      log(err instanceof Error ? err.message : String(err));
      process.exit(1);
    },
  );
}
