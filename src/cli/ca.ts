// `vtpm ca show --run DIR [--out FILE]`: the EK CA chain a verifier needs (issuing certificate first,
// root last), as the host's manager wrote it into its run directory at start (docs/ek-certificates.md).
import type { Command } from 'commander';
import fs from 'node:fs';
import { join } from 'node:path';
import { CA_CHAIN_FILE } from '../manager/ca-files.js';
import { RunDir } from './rundir.js';
import { CliError } from './errors.js';

export function caChain(runDir: string): string {
  const h = new RunDir(runDir).readHost();
  const file = join(h.managerRunDir, CA_CHAIN_FILE);
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    throw new CliError('HOST_DOWN', `no EK CA chain at ${file}: is the host's manager up? (\`vtpm host up --run ${runDir} --state DIR\`)`);
  }
}

export function register(program: Command): void {
  const ca = program.command('ca').description("the host's EK certificate authority");
  ca.command('show')
    .description('print (or write) the EK CA chain, PEM, issuing certificate first: what `openssl verify -CAfile` needs')
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--out <file>', 'write the chain to FILE instead of printing it')
    .action((o: { run: string; out?: string }) => {
      const pem = caChain(o.run);
      if (o.out) fs.writeFileSync(o.out, pem);
      else process.stdout.write(pem);
    });
}
