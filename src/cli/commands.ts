// Every subcommand of `vtpm`, one module each. Keep one line per module so parallel work merges.
import type { Command } from 'commander';
import { register as vtpmDomain } from './vtpm-domain.js';

type Register = (program: Command) => void;

const registrars: Register[] = [
  vtpmDomain,
];

export function registerCommands(program: Command): void {
  for (const r of registrars) r(program);
}
