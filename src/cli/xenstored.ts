// `vtpm xenstored --socket PATH --domain-socket-dir DIR`: the XenStore daemon in the foreground.
// Point Debian's xenstore-* tools at it with XENSTORED_PATH=PATH; guests connect to DIR/dom<N>.sock
// once dom0 has introduced them.
import type { Command } from 'commander';
import { XenstoreDaemon } from '../xenstore/daemon.js';
import { onStop } from './lifecycle.js';
import { makeLog, parseLogFormat } from '../util/log.js';
import { serveDaemonMetrics } from '../util/metrics-http.js';

export function register(program: Command): void {
  program
    .command('xenstored')
    .description('run the XenStore daemon (xs_wire over UNIX sockets) in the foreground')
    .requiredOption('--socket <path>', 'dom0 (privileged) socket; what XENSTORED_PATH points at')
    .requiredOption('--domain-socket-dir <dir>', 'directory for the per-domain sockets dom<N>.sock')
    .option('--verbose', 'log closed connections and protocol violations to stderr')
    .option('--log-format <fmt>', 'text (default) or json: one JSON object per event (docs/observability.md)', 'text')
    .option('--domain-uid-base <n>', 'dom<N>.sock is owned by uid BASE+N (domains under their own uids, docs/isolation.md)', (v) => Number(v))
    .action(async (opts: { socket: string; domainSocketDir: string; verbose?: boolean; domainUidBase?: number; logFormat: string }) => {
      const log = makeLog('xenstored', parseLogFormat(opts.logFormat), 'stderr', (l) => `xenstored: ${l}\n`);
      const stopMetrics = await serveDaemonMetrics('xenstored');
      if (opts.domainUidBase !== undefined && !(Number.isInteger(opts.domainUidBase) && opts.domainUidBase > 0)) throw new Error('--domain-uid-base takes a positive integer');
      const daemon = new XenstoreDaemon({
        socket: opts.socket,
        domainSocketDir: opts.domainSocketDir,
        ...(opts.domainUidBase !== undefined ? { domainUidBase: opts.domainUidBase } : {}),
        log: opts.verbose ? log : undefined,
      });
      await daemon.start();
      onStop(async () => {
        await daemon.stop();
        await stopMetrics();
      });
      // tests and scripts wait for this line before connecting
      process.stdout.write(`xenstored listening on ${opts.socket}\n`);
    });
}
