// Every subcommand of `vtpm`, one module each. Keep one line per module so parallel work merges.
import type { Command } from 'commander';
import { register as manager } from './manager.js';

type Register = (program: Command) => void;

const registrars: Register[] = [
  manager,
];

export function registerCommands(program: Command): void {
  for (const r of registrars) r(program);
}
