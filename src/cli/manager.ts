// `vtpm manager --state DIR --run DIR [--seal-to-tpm TCTI]`: the vTPM manager daemon in the foreground.
import type { Command } from 'commander';
import os from 'node:os';
import { resolve } from 'node:path';
import { DEFAULT_SEAL_PCRS } from '../manager/seal.js';
import { onStop } from './lifecycle.js';
import { makeLog, parseLogFormat } from '../util/log.js';
import { serveDaemonMetrics } from '../util/metrics-http.js';
import { addStoreOptions, parseStoreFlags } from './store-flags.js';
import { EK_CODES, type EkCode } from '../manager/wire.js';
import { DEFAULT_PLATFORM } from '../manager/ca-files.js';

export function register(program: Command): void {
  const cmd = program
    .command('manager')
    .description('run the vTPM manager: VM table, sealed crash-safe vTPM state, Xen 3.x FIFO protocol')
    .requiredOption('--state <dir>', 'state directory (master key, VM table, sealed blobs)')
    .requiredOption('--run <dir>', 'run directory (from_console.fifo, to_console.fifo, rendezvous.fifo, clients/)')
    .option('--seal-to-tpm <tcti>', 'seal the master key to PCRs of a host TPM (tpm2-tools TCTI, e.g. swtpm:host=127.0.0.1,port=2321)')
    .option('--seal-pcrs <sel>', 'PCR selection the master key is sealed to', DEFAULT_SEAL_PCRS)
    .option('--log-bytes <n>', 'size of the write-ahead log; a full log makes the next commit a checkpoint', (v) => Number(v))
    .option('--append <mode>', 'log appends on the event loop (sync) or the threadpool (async)', 'sync')
    .option('--log-format <fmt>', 'text (default) or json: one JSON object per event (docs/observability.md)', 'text')
    .option('--client-stall-ms <ms>', 'cut off a client whose replies sit unread this long (default 30000)', (v) => Number(v))
    .option('--ca <dir>', "an operator's EK CA: DIR/cert.pem (issuing certificate, then its chain) and DIR/key.pem; default: the host CA in STATE/ca")
    .option('--ek-certs <which>', 'EK certificates of a new TPM whose OPEN does not choose: rsa, ecc, both or none (a TPM 1.2 is certified under rsa and both)', 'both')
    .option('--platform-manufacturer <s>', 'platform certificate of a new TPM 2.0: platformManufacturerStr', DEFAULT_PLATFORM.manufacturer)
    .option('--platform-model <s>', 'platform certificate: platformModel', DEFAULT_PLATFORM.model)
    .option('--platform-version <s>', 'platform certificate: platformVersion', DEFAULT_PLATFORM.version)
    .option('--host-name <name>', 'with --store: this host\'s name in its claims on VMs, unique in the cluster (default HOSTNAME:RUN)');
  addStoreOptions(cmd).action(
    async (o: { state: string; run: string; sealToTpm?: string; sealPcrs: string; logBytes?: number; append: string; clientStallMs?: number; hostName?: string; store?: string; masterKey?: string; leaseTtl?: string; logFormat: string; ca?: string; ekCerts: string; platformManufacturer: string; platformModel: string; platformVersion: string }) => {
      if (!Object.keys(EK_CODES).includes(o.ekCerts)) throw new Error(`--ek-certs takes rsa, ecc, both or none, not ${o.ekCerts}`);
      const store = parseStoreFlags(o);
      if (store && o.sealToTpm) throw new Error('--seal-to-tpm seals a local key file; with --store every host shares --master-key');
      const log = makeLog('manager', parseLogFormat(o.logFormat), 'stderr', (l) => `vtpm-manager: ${l}\n`);
      const stopMetrics = await serveDaemonMetrics('manager');
      if (o.append !== 'sync' && o.append !== 'async') throw new Error(`--append takes sync or async, not ${o.append}`);
      if (o.logBytes !== undefined && !(Number.isInteger(o.logBytes) && o.logBytes >= 4096)) throw new Error('--log-bytes takes an integer of at least 4096');
      if (o.clientStallMs !== undefined && !(Number.isInteger(o.clientStallMs) && o.clientStallMs >= 100)) throw new Error('--client-stall-ms takes an integer of at least 100');
      if (!process.env.UV_THREADPOOL_SIZE)
        process.stderr.write('vtpm-manager: UV_THREADPOOL_SIZE is unset: a group commit will run only 4 fdatasyncs at a time (scripts/vtpm sets 64)\n');
      const etcd = store && {
        url: store.url,
        masterKey: store.masterKey,
        leaseTtl: store.leaseTtl,
        host: o.hostName ?? `${os.hostname()}:${resolve(o.run)}`,
        tls: store.etcdCa ? { ca: store.etcdCa, cert: store.etcdCert, key: store.etcdKey } : undefined,
      };
      // Loaded here only: the daemon brings libtpms (manufacture) and the X.509 library, which no other command needs.
      const { ManagerDaemon } = await import('../manager/daemon.js');
      const d = await ManagerDaemon.start({ stateDir: o.state, runDir: o.run, sealToTpm: o.sealToTpm, sealPcrs: o.sealPcrs, logBytes: o.logBytes, append: o.append, log, clientQueue: o.clientStallMs === undefined ? undefined : { stallMs: o.clientStallMs }, etcd, ca: o.ca, ekCerts: o.ekCerts as EkCode, platform: { manufacturer: o.platformManufacturer, model: o.platformModel, version: o.platformVersion } });
      onStop(async () => {
        await d.stop();
        await stopMetrics();
      });
      process.stderr.write('vtpm-manager: ready\n');
    },
  );
}
