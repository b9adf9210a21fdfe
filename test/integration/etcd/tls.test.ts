// The TLS flags reach etcd as they are: a 3-member cluster serving TLS on its client ports and asking
// for client certificates (certificates made here with openssl); a manager with --etcd-ca, --etcd-cert
// and --etcd-key stores and loads through it; without a client certificate, or without TLS, it cannot.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../../helpers/child.js';
import { tempDir, removeDir } from '../../helpers/temp.js';
import { ManagerClient } from '../../../src/manager/client.js';
import { EtcdCluster } from '../../../scripts/bench/_etcd.js';

const cli = join(ROOT, 'dist/src/cli/main.js');
const work = tempDir('etcd-tls');
const pem = (n: string) => join(work, n);
let etcd: EtcdCluster;

function openssl(...args: string[]): void {
  execFileSync('openssl', args, { cwd: work, stdio: 'pipe' });
}

/** A manager process; resolves {code, log} when it exits, or {ready} once it serves. */
function manager(name: string, tls: string[]): Promise<{ ready: boolean; log: string; stop: () => Promise<void>; run: string }> {
  const run = join(work, `${name}-run`);
  const p = spawn(process.execPath, [cli, 'manager', '--state', join(work, `${name}-state`), '--run', run, '--store', etcd.url, '--master-key', pem('master.key'), ...tls], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: '4' },
  });
  let log = '';
  const exited = new Promise((r) => p.once('exit', r));
  const stop = async () => {
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGTERM');
    await exited;
  };
  return new Promise((resolve) => {
    p.stderr!.on('data', (d: Buffer) => {
      log += d.toString();
      if (/vtpm-manager: ready/.test(log)) resolve({ ready: true, log, stop, run });
    });
    p.on('exit', () => resolve({ ready: false, log, stop, run }));
  });
}

beforeAll(async () => {
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=vtpm test CA');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'node.key', '-out', 'node.csr', '-subj', '/CN=127.0.0.1');
  fs.writeFileSync(pem('ext.cnf'), 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n');
  openssl('x509', '-req', '-in', 'node.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'node.pem', '-days', '2', '-extfile', 'ext.cnf');
  fs.writeFileSync(pem('master.key'), randomBytes(32), { mode: 0o600 });
  etcd = await EtcdCluster.start(3, { dir: join(work, 'etcd'), tls: { ca: pem('ca.pem'), cert: pem('node.pem'), key: pem('node.key') } });
}, 60_000);

afterAll(async () => {
  await etcd?.stop();
  removeDir(work);
}, 60_000);

describe('etcd over TLS', () => {
  it('a manager with --etcd-ca/--etcd-cert/--etcd-key stores and loads; without a client certificate or TLS it cannot connect', async () => {
    const m = await manager('tls', ['--etcd-ca', pem('ca.pem'), '--etcd-cert', pem('node.pem'), '--etcd-key', pem('node.key')]);
    expect(m.ready).toBe(true);
    const c = await ManagerClient.connect(m.run);
    try {
      const { instance } = await c.open({ vmUuid: randomUUID(), version: '2.0' });
      await c.store(instance, 'permanent', Buffer.from('over tls'));
      expect(Buffer.from((await c.load(instance, 'permanent'))!).toString()).toBe('over tls');
    } finally {
      c.disconnect();
      await m.stop();
    }
    const noCert = await manager('no-cert', ['--etcd-ca', pem('ca.pem')]);
    await noCert.stop();
    expect(noCert.ready).toBe(false);
    expect(noCert.log).toMatch(/etcd did not answer/);
    const plain = await manager('plain', []);
    await plain.stop();
    expect(plain.ready).toBe(false);
    expect(plain.log).toMatch(/etcd did not answer/);
  }, 120_000);
});
