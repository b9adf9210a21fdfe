// Every subcommand of `vtpm`, one module each. Keep one line per module so parallel work merges.
import type { Command } from 'commander';
import { register as backend } from './backend.js';
import { register as ca } from './ca.js';
import { register as demo } from './demo.js';
import { register as guest } from './guest.js';
import { register as host } from './host.js';
import { register as hypervisor } from './hypervisor.js';
import { register as manager } from './manager.js';
import { register as migrate } from './migrate.js';
import { register as qemu } from './qemu.js';
import { register as ringDemo } from './ring-demo.js';
import { register as stress } from './stress.js';
import { register as top } from './top.js';
import { register as xenstored } from './xenstored.js';

type Register = (program: Command) => void;

const registrars: Register[] = [
  backend,
  ca,
  demo,
  guest,
  host,
  hypervisor,
  manager,
  migrate,
  qemu,
  ringDemo,
  stress,
  top,
  xenstored,
];

export function registerCommands(program: Command): void {
  for (const r of registrars) r(program);
}
