// `--store etcd://H:P[,H:P…][/prefix] --master-key FILE [--lease-ttl S] [--etcd-ca F --etcd-cert F
// --etcd-key F]`: the manager's state in an etcd cluster (docs/cluster.md), on `vtpm manager` and
// `vtpm host up` alike; `host up` records them in host.json and passes them to its manager.
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { CliError } from './errors.js';
import { parseEtcdUrl } from '../manager/etcd-claims.js';

export interface StoreFlags {
  url: string;
  masterKey: string;
  leaseTtl: number;
  etcdCa?: string;
  etcdCert?: string;
  etcdKey?: string;
}

export const DEFAULT_LEASE_TTL = 10;

export function addStoreOptions(cmd: Command): Command {
  return cmd
    .option('--store <url>', 'keep vTPM state in an etcd cluster: etcd://HOST:PORT[,HOST:PORT…][/prefix] (default: the local write-ahead-log store in --state)')
    .option('--master-key <file>', 'with --store: the 32-byte key file (mode 0600) every host of the cluster shares')
    .option('--lease-ttl <s>', `with --store: seconds a host's claims outlive its last lease renewal (default ${DEFAULT_LEASE_TTL})`)
    .option('--etcd-ca <file>', 'with --store: CA certificate (PEM) of the etcd members; connects over TLS')
    .option('--etcd-cert <file>', 'with --etcd-ca: client certificate (PEM) for etcd')
    .option('--etcd-key <file>', 'with --etcd-ca: client private key (PEM) for etcd');
}

export function parseStoreFlags(o: { store?: string; masterKey?: string; leaseTtl?: string; etcdCa?: string; etcdCert?: string; etcdKey?: string }): StoreFlags | undefined {
  if (o.store === undefined) {
    for (const [flag, v] of [['--master-key', o.masterKey], ['--lease-ttl', o.leaseTtl], ['--etcd-ca', o.etcdCa], ['--etcd-cert', o.etcdCert], ['--etcd-key', o.etcdKey]] as const)
      if (v !== undefined) throw new CliError('USAGE', `${flag} belongs with --store etcd://…`);
    return undefined;
  }
  try {
    parseEtcdUrl(o.store);
  } catch (err) {
    throw new CliError('USAGE', (err as Error).message);
  }
  if (!o.masterKey) throw new CliError('USAGE', '--store needs --master-key FILE (the key every host of the cluster shares)');
  const ttl = o.leaseTtl === undefined ? DEFAULT_LEASE_TTL : Number(o.leaseTtl);
  if (!Number.isInteger(ttl) || ttl < 2 || ttl > 3600) throw new CliError('USAGE', `--lease-ttl takes whole seconds from 2 to 3600, not ${o.leaseTtl}`);
  if ((o.etcdCert || o.etcdKey) && !o.etcdCa) throw new CliError('USAGE', '--etcd-cert and --etcd-key need --etcd-ca');
  if (!o.etcdCert !== !o.etcdKey) throw new CliError('USAGE', '--etcd-cert and --etcd-key go together');
  const abs = (f?: string): string | undefined => (f === undefined ? undefined : resolve(f));
  return { url: o.store, masterKey: resolve(o.masterKey), leaseTtl: ttl, etcdCa: abs(o.etcdCa), etcdCert: abs(o.etcdCert), etcdKey: abs(o.etcdKey) };
}

/** The same flags as arguments, for the manager `host up` starts. */
export function storeArgs(f: StoreFlags | undefined): string[] {
  if (!f) return [];
  const a = ['--store', f.url, '--master-key', f.masterKey, '--lease-ttl', String(f.leaseTtl)];
  if (f.etcdCa) a.push('--etcd-ca', f.etcdCa);
  if (f.etcdCert && f.etcdKey) a.push('--etcd-cert', f.etcdCert, '--etcd-key', f.etcdKey);
  return a;
}
