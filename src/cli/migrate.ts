// `vtpm migrate key|out|in|show`: moves a vTPM's state from one manager to another (Xen 3.x's
// vtpm_migrator steps, by hand): the destination's public key (GET_MIG_KEY) goes to the source, which
// loads it (LOAD_MIG_KEY) and seals the VM's state to it (MIGRATE_OUT); the blob goes to the
// destination (MIGRATE_IN). Key files are PEM SubjectPublicKeyInfo, so openssl reads them too.
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { Command } from 'commander';
import { ManagerClient } from '../manager/client.js';
import { fingerprint, publicKeyFrom, readBlobHeader, rsaPublicOf } from '../manager/migration.js';
import { isUuid } from '../manager/wire.js';

async function withManager<T>(runDir: string, fn: (c: ManagerClient) => Promise<T>): Promise<T> {
  // Attached through the console: migration ordinals are privileged and blobs exceed PIPE_BUF.
  const c = await ManagerClient.connect(runDir, { privileged: true, reconnect: false, name: `migrate-${process.pid}` });
  try {
    return await fn(c);
  } finally {
    c.disconnect();
  }
}

/** Written next to its final name and renamed: a half-written key or blob is never mistaken for one. */
function writeFileAtomic(file: string, data: string | Uint8Array): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data, { mode: 0o600 });
  fs.renameSync(tmp, file);
}

function readKeyFile(file: string): crypto.KeyObject {
  const key = crypto.createPublicKey(fs.readFileSync(file));
  // Through Xen's (exponent, modulus) form: the same size and shape checks the manager applies.
  return publicKeyFrom(rsaPublicOf(key));
}

export function register(program: Command): void {
  const mig = program.command('migrate').description("move a vTPM between managers (GET_MIG_KEY, LOAD_MIG_KEY, MIGRATE_OUT, MIGRATE_IN)");

  mig
    .command('key')
    .description("write this manager's public migration key (destination side; made at first use)")
    .requiredOption('--run <dir>', "the manager's run directory")
    .requiredOption('--out <file>', 'PEM public key file to write')
    .action(async (o: { run: string; out: string }) => {
      const pub = await withManager(o.run, async (c) => publicKeyFrom(await c.migrationKey()));
      writeFileAtomic(o.out, pub.export({ format: 'pem', type: 'spki' }));
      process.stdout.write(`${fingerprint(pub).toString('hex')}\n`);
    });

  mig
    .command('out')
    .description("seal a VM's vTPM state to a destination key (source side); the VM is then refused here until deleted")
    .requiredOption('--run <dir>', "the source manager's run directory")
    .option('--vm <uuid>', 'the VM whose vTPM moves')
    .option('--instance <n>', 'or its instance number', (v) => Number(v))
    .requiredOption('--to-key <file>', "the destination manager's key (from `vtpm migrate key`)")
    .option('--name <name>', 'name the key is loaded under (Xen: the destination address); default: key-<fingerprint>')
    .requiredOption('--out <file>', 'blob file to write')
    .action(async (o: { run: string; vm?: string; instance?: number; toKey: string; name?: string; out: string }) => {
      if ((o.vm === undefined) === (o.instance === undefined)) throw new Error('give exactly one of --vm UUID and --instance N');
      if (o.vm !== undefined && !isUuid(o.vm.toLowerCase())) throw new Error(`--vm takes a uuid, not ${o.vm}`);
      if (o.instance !== undefined && !(Number.isInteger(o.instance) && o.instance > 0)) throw new Error('--instance takes a positive integer');
      const key = readKeyFile(o.toKey);
      const name = o.name ?? `key-${fingerprint(key).toString('hex').slice(0, 16)}`;
      const blob = await withManager(o.run, async (c) => {
        await c.loadMigrationKey(name, rsaPublicOf(key));
        return c.migrateOut(o.vm?.toLowerCase() ?? o.instance!, name);
      });
      writeFileAtomic(o.out, blob);
      const h = readBlobHeader(blob);
      process.stdout.write(`vm ${h.vmUuid} instance ${h.instance} counter ${h.counter}: ${blob.length} bytes to ${o.out}\n`);
    });

  mig
    .command('in')
    .description('register a migrated vTPM at this manager (destination side)')
    .requiredOption('--run <dir>', "the destination manager's run directory")
    .requiredOption('--blob <file>', 'blob file from `vtpm migrate out`')
    .option('--instance <n>', 'instance number to give it (default: the lowest free one)', (v) => Number(v), 0)
    .action(async (o: { run: string; blob: string; instance: number }) => {
      if (!(Number.isInteger(o.instance) && o.instance >= 0)) throw new Error('--instance takes a non-negative integer');
      const blob = fs.readFileSync(o.blob);
      const instance = await withManager(o.run, (c) => c.migrateIn(blob, o.instance));
      process.stdout.write(`vm ${readBlobHeader(blob).vmUuid}: instance ${instance}\n`);
    });

  mig
    .command('show')
    .description("print a blob's clear header (VM, counter, keys); decrypts nothing")
    .requiredOption('--blob <file>', 'blob file')
    .action((o: { blob: string }) => {
      const h = readBlobHeader(fs.readFileSync(o.blob));
      const out = {
        vmUuid: h.vmUuid,
        tpmVersion: h.version,
        vmType: h.vmType,
        sourceInstance: h.instance,
        counter: h.counter,
        id: h.id.toString('hex'),
        destinationKey: h.destination.toString('hex'),
        sourceKey: h.source.toString('hex'),
      };
      process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    });
}
