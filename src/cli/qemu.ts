// `vtpm qemu attach|detach`: give a QEMU VM a swtpm-compatible vTPM endpoint (for -tpmdev emulator)
// served by the host's backend on the VM's manager-backed vTPM. The toolstack's part: write the node
// the backend watches (src/backend/qemu-devices.ts) and wait for its answer.
import { addEkOptions, ekChoice, openWithEk, type EkFlags } from './ek.js';
import type { EkCode } from '../manager/wire.js';
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect, type XsClient } from '../xenstore/client.js';
import { QEMU_ROOT, QemuNodeState } from '../backend/qemu-devices.js';
import { RunDir } from './rundir.js';
import { fileSize, managerReason, openRefusal } from './errors.js';import { captureKeys } from './capture-opts.js';


const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export interface QemuAttachOptions {
  run: string;
  vm: string;
  ctrl: string;
  version?: '2.0' | '1.2';
  timeoutMs?: number;
  /** EK certificates of a new VM's TPM (`--ek-profile`, `--no-ek-cert`); absent: the manager's default. */
  ek?: EkCode;
  /** The backend captures the VM's TPM traffic to this pcapng file (docs/observability.md), at most pcapMaxMb MiB. */
  pcap?: string;
  pcapMaxMb?: number;
}

async function nodes(xs: XsClient): Promise<string[]> {
  try {
    return (await xs.directory(QEMU_ROOT)).filter((n) => /^[0-9]+$/.test(n));
  } catch {
    return [];
  }
}

async function waitState(xs: XsClient, node: string, want: number[], timeoutMs: number): Promise<number> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const s = Number(await xs.tryRead(`${node}/state`));
    if (want.includes(s)) return s;
    if (Date.now() > end) throw new Error(`${node}: state ${s} after ${timeoutMs} ms (wanted ${want.join('/')})`);
    await sleep(20);
  }
}

/** Resolves with the node number once the backend listens on `ctrl`. */
export async function qemuAttach(o: QemuAttachOptions): Promise<number> {
  if (!UUID.test(o.vm)) throw new Error(`--vm must be a UUID, not ${o.vm}`);
  const version = o.version ?? '2.0';
  if (version !== '2.0' && version !== '1.2') throw new Error('--tpm-version must be 2.0 or 1.2');
  const ctrl = resolve(o.ctrl);
  const capture = captureKeys(o.pcap, o.pcapMaxMb);
  const rd = new RunDir(o.run);
  const h = rd.readHost();
  const mgrLogFrom = fileSize(rd.log('manager'));
  if (o.ek !== undefined) await openWithEk(h, rd.log('manager'), o.vm.toLowerCase(), version, o.ek);
  const xs = await connect(h.xenstoredSocket);
  try {
    const uuid = o.vm.toLowerCase();
    // Pick a free node number and claim it in one transaction; one endpoint per VM and per socket.
    const n = await xs.transaction(async (tx) => {
      let ids: string[] = [];
      try {
        ids = (await xs.directory(QEMU_ROOT, tx)).filter((x) => /^[0-9]+$/.test(x));
      } catch {
        /* first node */
      }
      for (const id of ids) {
        if ((await xs.tryRead(`${QEMU_ROOT}/${id}/uuid`, tx)) === uuid) throw new Error(`VM ${uuid} already has a QEMU vTPM (node ${id})`);
        if ((await xs.tryRead(`${QEMU_ROOT}/${id}/ctrl`, tx)) === ctrl) throw new Error(`${ctrl} is already served (node ${id})`);
      }
      let next = 0;
      while (ids.includes(String(next))) next++;
      const node = `${QEMU_ROOT}/${next}`;
      await xs.write(`${node}/uuid`, uuid, tx);
      await xs.write(`${node}/ctrl`, ctrl, tx);
      await xs.write(`${node}/tpm-version`, version, tx);
      for (const [k, v] of Object.entries(capture)) await xs.write(`${node}/${k}`, v, tx);
      await xs.write(`${node}/state`, String(QemuNodeState.INITIALISING), tx);
      return next;
    });
    const node = `${QEMU_ROOT}/${n}`;
    const s = await waitState(xs, node, [QemuNodeState.CONNECTED, QemuNodeState.CLOSED], o.timeoutMs ?? 30_000);
    if (s !== QemuNodeState.CONNECTED) {
      const err = (await xs.tryRead(`${node}/error`)) ?? 'backend refused the device';
      await xs.rm(node).catch(() => {});
      // The manager's own reason for refusing the vTPM (migrated out, …) when it refused it.
      const why = managerReason(rd.log('manager'), mgrLogFrom, 'OPEN');
      throw openRefusal(uuid, err, why);
    }
    return n;
  } finally {
    await xs.close();
  }
}

/** Close the endpoint of a VM (by --vm or --ctrl) and remove its node. */
export async function qemuDetach(o: { run: string; vm?: string; ctrl?: string; timeoutMs?: number }): Promise<number> {
  if (!o.vm && !o.ctrl) throw new Error('give --vm or --ctrl');
  const h = new RunDir(o.run).readHost();
  const xs = await connect(h.xenstoredSocket);
  try {
    const ctrl = o.ctrl ? resolve(o.ctrl) : undefined;
    for (const id of await nodes(xs)) {
      const node = `${QEMU_ROOT}/${id}`;
      const uuid = await xs.tryRead(`${node}/uuid`);
      const c = await xs.tryRead(`${node}/ctrl`);
      if ((o.vm && uuid === o.vm.toLowerCase()) || (ctrl && c === ctrl)) {
        await xs.write(`${node}/state`, String(QemuNodeState.CLOSING));
        await waitState(xs, node, [QemuNodeState.CLOSED], o.timeoutMs ?? 30_000);
        await xs.rm(node);
        return Number(id);
      }
    }
    throw new Error(`no QEMU vTPM for ${o.vm ?? ctrl}`);
  } finally {
    await xs.close();
  }
}

export function register(program: Command): void {
  const qemu = program.command('qemu').description('swtpm-compatible vTPM endpoints for QEMU guests (-tpmdev emulator)');
  const attach = qemu
    .command('attach')
    .description("serve the VM's vTPM on a UNIX control socket for QEMU; returns once it listens")
    .requiredOption('--run <dir>', 'run directory of the host')
    .requiredOption('--vm <uuid>', 'the VM the vTPM belongs to (the manager keys its vTPM by this)')
    .requiredOption('--ctrl <path>', 'control socket to create (QEMU: -chardev socket,path=PATH)')
    .option('--tpm-version <v>', 'TPM version of a new vTPM: 2.0 or 1.2', '2.0')
    .option('--pcap <file>', 'the backend writes the VM\'s TPM commands (TCP port 2321) to FILE (pcapng)')
    .option('--pcap-max-mb <n>', 'stop capturing at N MiB (default 100)', (v) => Number(v));
  addEkOptions(attach)
    .action(async (o: { run: string; vm: string; ctrl: string; tpmVersion: string; pcap?: string; pcapMaxMb?: number } & EkFlags) => {
      const version = o.tpmVersion as '2.0' | '1.2';
      const n = await qemuAttach({ run: o.run, vm: o.vm, ctrl: o.ctrl, version, ek: ekChoice(o, version), ...(o.pcap !== undefined ? { pcap: o.pcap } : {}), ...(o.pcapMaxMb !== undefined ? { pcapMaxMb: o.pcapMaxMb } : {}) });
      console.log(`VM ${o.vm}: vTPM listening on ${resolve(o.ctrl)} (node ${n})`);
    });
  qemu
    .command('detach')
    .description("close the VM's QEMU endpoint and release its vTPM (state stays at the manager)")
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--vm <uuid>', 'the VM')
    .option('--ctrl <path>', 'or its control socket')
    .action(async (o: { run: string; vm?: string; ctrl?: string }) => {
      const n = await qemuDetach(o);
      console.log(`QEMU vTPM node ${n} detached`);
    });
}
