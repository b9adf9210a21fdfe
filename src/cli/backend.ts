// `vtpm backend --run DIR`: the backend process of a host (started by `vtpm host up`).
import type { Command } from 'commander';
import fs from 'node:fs';
import { RunDir, type HostInfo } from './rundir.js';
import type { ManagerClient } from '../manager/client.js';
import type { XsClient } from '../xenstore/client.js';
import { onStop } from './lifecycle.js';
import { makeLog, parseLogFormat } from '../util/log.js';
import { serveDaemonMetrics, serveHostMetrics } from '../util/metrics-http.js';

export function register(program: Command): void {
  program
    .command('backend')
    .description('run the vTPM backend (tpmback) of the host in RUN (normally started by `host up`)')
    .requiredOption('--run <dir>', 'run directory of the host')
    .option('--log-format <fmt>', 'text (default) or json: one JSON object per event (docs/observability.md)', 'text')
    .action(async (o: { run: string; logFormat: string }) => {
      const h = new RunDir(o.run).readHost();
      const log = makeLog('backend', parseLogFormat(o.logFormat), 'stdout', (l) => `${new Date().toISOString()} ${l}\n`);
      const stopMetrics = await serveDaemonMetrics('backend');
      // `host up --metrics HOST:PORT`: the whole host's metrics, merged here at each scrape.
      const hostMetrics = h.metrics ? await serveHostMetrics(h.metrics, o.run, ['hypervisor', 'xenstored', 'manager']) : null;
      // Import after reading the mode: the engine sizes the libuv pool when it loads.
      const { TpmHost } = await import('../tpm/host.js');
      const { ManagerClient } = await import('../manager/client.js');
      const { InProcessVtpms } = await import('../backend/single-vm.js');
      const { Backend } = await import('../backend/tpmback.js');
      const mgr = await ManagerClient.connect(h.managerRunDir, { name: 'backend' });
      // One spare TPM 2.0, manufactured while idle, makes a new VM's first attach skip the library load
      // and manufacture (~2–3 ms); it costs ~0.3 MiB (VTPM_SPARES=0 turns it off). Only single-VM mode
      // hosts instances here.
      const spares = h.mode === 'single' ? Number(process.env.VTPM_SPARES ?? 1) : 0;
      if (!Number.isInteger(spares) || spares < 0 || spares > 64) throw new Error(`VTPM_SPARES=${process.env.VTPM_SPARES}: want 0..64`);
      const host = new TpmHost({ spares });
      // --- multi-VM mode (issue 8): one vTPM-domain process per guest device, reached over a ring ---
      const multi = h.mode === 'multi' ? await multiVm(h, mgr, new RunDir(o.run).vtpmDomainDir, log) : null;
      const backend = await Backend.start({
        xenDir: h.xenDir,
        xenstoredSocket: h.xenstoredSocket,
        vtpms: multi?.vtpms ?? new InProcessVtpms(host, mgr, log),
        log,
        ...(multi ? { domain: multi.dom } : {}),
      });
      // --- stub-domain mode: each guest's vTPM domain is its device's backend; dom0 runs their lifecycle ---
      const stubdoms = h.mode === 'stubdom' ? await stubdomLifecycle(h, backend, mgr, new RunDir(o.run).vtpmDomainDir, log) : null;
      onStop(async () => {
        await stubdoms?.stop();
        await backend.stop();
        await multi?.vtpms.stopAll();
        await host.destroyAll();
        mgr.disconnect();
        await hostMetrics?.stop();
        await stopMetrics();
        log('vtpm-backend: stopped');
      });
      log('vtpm-backend: ready');
    });
}

/** The stub domains' lifecycle on dom0's xenstore connection, each domain under its own uid when isolated. */
async function stubdomLifecycle(h: HostInfo, backend: { xs: XsClient }, mgr: ManagerClient, registerDir: string, log: (l: string) => void) {
  const { StubdomLifecycle } = await import('../backend/stubdom.js');
  const { domainNodeFlags } = await import('../backend/domain-flags.js');
  const { domainLaunch } = await import('./isolation.js');
  const iso = h.isolation;
  return StubdomLifecycle.start({
    xs: backend.xs,
    mgr,
    managerRunDir: h.managerRunDir,
    xenDir: h.xenDir,
    domainSocketDir: h.domainSocketDir,
    registerDir,
    log,
    nodeFlags: domainNodeFlags(),
    launch: (domid, file, args) => domainLaunch(iso, domid, 'vtpm-domain', file, args),
  });
}

/** dom0 sized for one ring per vTPM domain (33 frames and grants each) and the multi-VM provider on it. */
async function multiVm(h: HostInfo, mgr: ManagerClient, registerDir: string, log: (l: string) => void) {
  const { Domain } = await import('../xen/index.js');
  const { MultiVmVtpms } = await import('../backend/multi-vm.js');
  fs.rmSync(registerDir, { recursive: true, force: true });
  fs.mkdirSync(registerDir, { recursive: true });
  const dom = await Domain.create({ domid: 0, dir: h.xenDir, geometry: { grantFrames: 16, nrPages: 8192, evtchnPages: 16 } });
  const { domainLaunch } = await import('./isolation.js');
  const iso = h.isolation;
  const vtpms = new MultiVmVtpms({
    dom,
    mgr,
    managerRunDir: h.managerRunDir,
    xenDir: h.xenDir,
    registerDir,
    log,
    launch: (domid, file, args) => domainLaunch(iso, domid, 'vtpm-domain', file, args),
  });
  const { backendMetrics, showDomains } = await import('../util/metrics.js');
  backendMetrics();
  showDomains(() => vtpms.domains());
  return { dom, vtpms };
}
