// Per VM, on `guest attach` and `qemu attach`: which EK certificates a new VM's TPM is manufactured with
// (`--ek-profile rsa|ecc|both`, `--no-ek-cert`). The toolstack opens the VM at the manager with that
// choice before its device exists, as Xen's hotplug scripts open a vTPM before the backend sees it; the
// manager manufactures it then. A VM that exists keeps what it was made with (docs/ek-certificates.md).
import type { Command } from 'commander';
import { ManagerClient } from '../manager/client.js';
import { Ord, type EkCode } from '../manager/wire.js';
import { CliError, explainManagerError, fileSize, managerReason } from './errors.js';
import type { HostInfo } from './rundir.js';

export interface EkFlags {
  ekProfile?: string;
  /** commander's `--no-ek-cert`: false when given. */
  ekCert?: boolean;
}

export function addEkOptions(c: Command): Command {
  return c
    .option('--ek-profile <which>', 'EK certificates of a new TPM 2.0: rsa, ecc or both (default: both); a TPM 1.2: rsa')
    .option('--no-ek-cert', 'manufacture a new TPM without EK certificates');
}

/** The choice the flags make, or undefined when they make none (the manager's default applies). */
export function ekChoice(f: EkFlags, version: '2.0' | '1.2'): EkCode | undefined {
  if (f.ekProfile !== undefined && f.ekCert === false) throw new CliError('USAGE', '--ek-profile and --no-ek-cert contradict each other: give one');
  if (f.ekProfile !== undefined && f.ekProfile !== 'rsa' && f.ekProfile !== 'ecc' && f.ekProfile !== 'both')
    throw new CliError('USAGE', `--ek-profile must be rsa, ecc or both, not ${f.ekProfile}`);
  const choice: EkCode | undefined = f.ekCert === false ? 'none' : (f.ekProfile as EkCode | undefined);
  if (choice !== undefined && choice !== 'none' && choice !== 'rsa' && version === '1.2') throw new CliError('USAGE', `--ek-profile ${choice}: a TPM 1.2 has one EK, an RSA key (--ek-profile rsa)`);
  return choice;
}

/** OPEN the VM with the choice; returns whether the manager created (and so manufactured) it now. */
export async function openWithEk(h: HostInfo, managerLog: string, vm: string, version: '2.0' | '1.2', ek: EkCode): Promise<boolean> {
  const from = fileSize(managerLog);
  let c: ManagerClient;
  try {
    c = await ManagerClient.connect(h.managerRunDir, { privileged: true, reconnect: false, name: `attach-${process.pid}` });
  } catch (err) {
    throw new CliError('HOST_DOWN', `cannot reach the manager in ${h.managerRunDir}: ${(err as Error).message}`);
  }
  try {
    const { created } = await c.open({ vmUuid: vm, version, ek });
    // Never re-issued: a VM that exists keeps the certificates it was manufactured with.
    if (!created) process.stderr.write(`vtpm: VM ${vm} exists; its TPM keeps the EK certificates it was made with (--ek-profile/--no-ek-cert apply to new VMs)\n`);
    return created;
  } catch (err) {
    await new Promise((r) => setTimeout(r, 50));
    throw explainManagerError(err, Ord.OPEN, `the vTPM of VM ${vm}`, managerReason(managerLog, from, 'OPEN'));
  } finally {
    c.disconnect();
  }
}
