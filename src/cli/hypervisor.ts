// `vtpm hypervisor --dir D`: the hypervisor process of a host in the foreground (docs/hypervisor.md).
// It owns every domain's memory, grant pins and event-channel routing; `host up` starts it first.
import type { Command } from 'commander';
import fs from 'node:fs';
import { join } from 'node:path';
import { Hypervisor, claimPidFile, hypervisorSocket } from '../xen/hypervisor.js';
import { xenDir } from '../xen/layout.js';
import { onStop } from './lifecycle.js';
import { makeLog, parseLogFormat } from '../util/log.js';
import { serveDaemonMetrics } from '../util/metrics-http.js';
import { hypervisorMetrics, showHypervisorDomains } from '../util/metrics.js';

export function register(program: Command): void {
  program
    .command('hypervisor')
    .description('run the hypervisor process (domain memory, grant mapping, event channels) in the foreground')
    .option('--dir <dir>', 'hypervisor directory (default VTPM_XEN_DIR or /dev/shm/vtpm-split)')
    .option('--verbose', 'log domain creation and destruction to stderr')
    .option('--log-format <fmt>', 'text (default) or json: one JSON object per event (docs/observability.md)', 'text')
    .action(async (opts: { dir?: string; verbose?: boolean; logFormat: string }) => {
      const log = makeLog('hypervisor', parseLogFormat(opts.logFormat), 'stderr', (l) => `hypervisor: ${l}\n`);
      const stopMetrics = await serveDaemonMetrics('hypervisor');
      const dir = xenDir(opts.dir);
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      if (!claimPidFile(dir)) throw new Error(`a hypervisor already runs for ${dir}`);
      const hv = new Hypervisor({ dir, log: opts.verbose ? log : undefined });
      await hv.listen();
      hypervisorMetrics();
      showHypervisorDomains(() => hv.domains.length);
      onStop(async () => {
        await hv.close();
        await stopMetrics();
        fs.rmSync(join(dir, 'hypervisor.pid'), { force: true });
      });
      // host up waits for this line
      process.stdout.write(`vtpm-hypervisor: ready on ${hypervisorSocket(dir)}\n`);
    });
}
