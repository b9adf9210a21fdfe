// `vtpm vtpm-domain`: host one vTPM alone in this process (multi-VM mode's vTPM domain), driven over
// stdin/stdout frames by the backend (src/tpm/domain-protocol.ts). Stops on SIGINT/SIGTERM or STOP.
import type { Command } from 'commander';
import { domainMain, parseDomainArgs } from '../tpm/domain-main.js';
import { onStop } from './lifecycle.js';

export function register(program: Command): void {
  program
    .command('vtpm-domain')
    .description('run one vTPM instance alone in this process (frames on stdin/stdout)')
    .requiredOption('--instance <n>', 'instance number (key of its state)')
    .requiredOption('--domid <id>', 'domain id of this vTPM domain')
    .option('--tpm-version <v>', 'TPM family: 2.0 or 1.2', '2.0')
    .requiredOption('--state-dir <dir>', 'directory StateStore for the instance state')
    .action(async (o: { instance: string; domid: string; tpmVersion: string; stateDir: string }) => {
      const args = parseDomainArgs([
        '--instance', o.instance, '--domid', o.domid, '--tpm-version', o.tpmVersion, '--state-dir', o.stateDir,
      ]);
      const done = domainMain(args);
      // Closing stdin is the domain's own stop signal; on SIGINT/SIGTERM close it and wait until the
      // instance is powered off and its pending state is durable.
      onStop(async () => {
        process.stdin.destroy();
        await done;
      });
      process.exitCode = await done;
    });
}
