// `vtpm backend --run DIR`: the backend process of a host (started by `vtpm host up`).
import type { Command } from 'commander';
import fs from 'node:fs';
import { RunDir, type HostInfo } from './rundir.js';
import type { ManagerClient } from '../manager/client.js';
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
      // --- multi-VM mode (issue 8): one vTPM-domain process per guest device, reached over a ring ---
      const multi = h.mode === 'multi' ? await multiVm(h, mgr, new RunDir(o.run).vtpmDomainDir, log) : null;
      const backend = await Backend.start({
        xenDir: h.xenDir,
        xenstoredSocket: h.xenstoredSocket,
        vtpms: multi?.vtpms ?? new InProcessVtpms(host, mgr, log),
        log,
        ...(multi ? { domain: multi.dom } : {}),
      });
      onStop(async () => {
        await backend.stop();
        await multi?.vtpms.stopAll();
        await host.destroyAll();
        mgr.disconnect();
        log('vtpm-backend: stopped');
      });
      log('vtpm-backend: ready');
    });
}

/** dom0 sized for one ring per vTPM domain (33 frames and grants each) and the multi-VM provider on it. */
async function multiVm(h: HostInfo, mgr: ManagerClient, registerDir: string, log: (l: string) => void) {
  const { Domain } = await import('../xen/index.js');
  const { MultiVmVtpms } = await import('../backend/multi-vm.js');
  fs.rmSync(registerDir, { recursive: true, force: true });
  fs.mkdirSync(registerDir, { recursive: true });
  const dom = await Domain.create({ domid: 0, dir: h.xenDir, geometry: { grantFrames: 16, nrPages: 8192, evtchnPages: 16 } });
  const vtpms = new MultiVmVtpms({ dom, mgr, managerRunDir: h.managerRunDir, xenDir: h.xenDir, registerDir, log });
  return { dom, vtpms };
}
