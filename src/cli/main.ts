#!/usr/bin/env node
// The `vtpm` command line. Each subcommand lives in its own file under src/cli/ and registers itself
// on the program here, so adding one is a one-line change to this list.
import { Command, CommanderError } from 'commander';
import { registerCommands } from './commands.js';
import { CliError, EXIT_CODES } from './errors.js';

const program = new Command();
program
  .name('vtpm')
  .description('Xen-style split-driver virtual TPMs: xenstored, manager, backend, guests')
  .showHelpAfterError()
  .enablePositionalOptions()
  // Usage errors exit 2 like the CLI's own (docs/cli.md); commander has printed them already.
  .exitOverride();

registerCommands(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
  const msg = err instanceof Error ? err.message : String(err);
  process.stderr.write(`vtpm: ${msg}\n`);
  process.exit(err instanceof CliError ? EXIT_CODES[err.code] : 1);
});
