// `vtpm backend --run DIR`: the backend process of a host (started by `vtpm host up`).
import type { Command } from 'commander';
import { RunDir } from './rundir.js';
import { onStop } from './lifecycle.js';

export function register(program: Command): void {
  program
    .command('backend')
    .description('run the vTPM backend (tpmback) of the host in RUN (normally started by `host up`)')
    .requiredOption('--run <dir>', 'run directory of the host')
    .action(async (o: { run: string }) => {
      const h = new RunDir(o.run).readHost();
      const log = (l: string): void => void process.stdout.write(`${new Date().toISOString()} ${l}\n`);
      // Import after reading the mode: the engine sizes the libuv pool when it loads.
      const { TpmHost } = await import('../tpm/host.js');
      const { ManagerClient } = await import('../manager/client.js');
      const { InProcessVtpms } = await import('../backend/single-vm.js');
      const { Backend } = await import('../backend/tpmback.js');
      const mgr = await ManagerClient.connect(h.managerRunDir, { name: 'backend' });
      const host = new TpmHost();
      const backend = await Backend.start({
        xenDir: h.xenDir,
        xenstoredSocket: h.xenstoredSocket,
        vtpms: new InProcessVtpms(host, mgr, log),
        log,
      });
      onStop(async () => {
        await backend.stop();
        await host.destroyAll();
        mgr.disconnect();
        log('vtpm-backend: stopped');
      });
      log('vtpm-backend: ready');
    });
}
