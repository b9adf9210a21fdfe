// `vtpm migrate key|out|in|show`: moves a vTPM's state from one manager to another (Xen 3.x's
// vtpm_migrator steps, by hand): the destination's public key (GET_MIG_KEY) goes to the source, which
// loads it (LOAD_MIG_KEY) and seals the VM's state to it (MIGRATE_OUT); the blob goes to the
// destination (MIGRATE_IN). Key files are PEM SubjectPublicKeyInfo, so openssl reads them too.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { ManagerClient } from '../manager/client.js';
import { fingerprint, publicKeyFrom, readBlobHeader, rsaPublicOf } from '../manager/migration.js';
import { Ord, isUuid } from '../manager/wire.js';
import { RunDir, alive } from './rundir.js';
import { CliError, explainManagerError, fileSize, managerReason } from './errors.js';

/** The manager's run directory for --run: a host's run directory stands for its manager/. */
function managerDir(run: string): { dir: string; log?: string; host?: RunDir } {
  const dir = resolve(run);
  if (!fs.existsSync(dir)) throw new CliError('NOT_FOUND', `--run ${dir} does not exist (give a host's run directory or its manager's)`);
  const rd = new RunDir(dir);
  if (fs.existsSync(rd.hostJson)) {
    const h = rd.readHost();
    return { dir: h.managerRunDir, log: rd.log('manager'), host: rd };
  }
  if (!fs.existsSync(join(dir, 'rendezvous.fifo'))) {
    throw new CliError('NOT_FOUND', `${dir} is neither a host's run directory (no host.json) nor a manager's (no rendezvous.fifo); is the manager running?`);
  }
  // A host's manager/: its log is the host's logs/manager.log.
  const parent = new RunDir(dirname(dir));
  const log = fs.existsSync(parent.hostJson) ? parent.log('manager') : undefined;
  return { dir, ...(log ? { log, host: parent } : {}) };
}

async function withManager<T>(run: string, ordinal: number, what: string, fn: (c: ManagerClient) => Promise<T>): Promise<T> {
  const m = managerDir(run);
  const from = fileSize(m.log);
  let c: ManagerClient;
  try {
    // Attached through the console: migration ordinals are privileged and blobs exceed PIPE_BUF.
    c = await ManagerClient.connect(m.dir, { privileged: true, reconnect: false, name: `migrate-${process.pid}` });
  } catch (err) {
    throw new CliError('HOST_DOWN', `cannot reach the manager in ${m.dir}: ${(err as Error).message}`);
  }
  try {
    return await fn(c);
  } catch (err) {
    // The manager writes its log line as it answers: give it a moment to land.
    await new Promise((r) => setTimeout(r, 50));
    // The ordinal the manager refused (a command may send several): its name leads the error.
    const named = err instanceof Error ? /^([A-Z_]+) on instance/.exec(err.message)?.[1] : undefined;
    const entry = Object.entries(Ord).find(([k, v]) => (named !== undefined ? k === named : v === ordinal));
    const [name, ord] = entry ?? ['', ordinal];
    throw explainManagerError(err, ord, what, managerReason(m.log, from, name));
  } finally {
    c.disconnect();
  }
}

/** A VM's guest attached on the host (or suspended there): its vTPM is in use. */
function attachedGuest(run: string, vm: string): { domid: number; suspended: boolean } | null {
  const host = managerDir(run).host;
  const g = host?.guests().find((x) => x.vm === vm && (x.suspended || alive(x.pid, x.start)));
  return g ? { domid: g.domid, suspended: g.suspended === true } : null;
}

/** Written next to its final name and renamed: a half-written key or blob is never mistaken for one. */
function writeFileAtomic(file: string, data: string | Uint8Array): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data, { mode: 0o600 });
  fs.renameSync(tmp, file);
}

function readKeyFile(file: string): crypto.KeyObject {
  let text: Buffer;
  try {
    text = fs.readFileSync(file);
  } catch (err) {
    throw new CliError('NOT_FOUND', `cannot read the key file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (!/^-----BEGIN PUBLIC KEY-----/m.test(text.toString('latin1'))) {
    throw new CliError('USAGE', `${file} is not a PEM public key (no "-----BEGIN PUBLIC KEY-----"); give the file \`vtpm migrate key --out FILE\` wrote on the destination`);
  }
  try {
    // Through Xen's (exponent, modulus) form: the same size and shape checks the manager applies.
    return publicKeyFrom(rsaPublicOf(crypto.createPublicKey(text)));
  } catch (err) {
    throw new CliError('USAGE', `${file} is not a usable RSA public key (${(err as Error).message}); give the file \`vtpm migrate key --out FILE\` wrote on the destination`);
  }
}

function readBlobFile(file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new CliError('NOT_FOUND', `cannot read the blob file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Output files go where the user said: a missing directory is named, not an ENOENT from a temp name. */
function checkOutDir(file: string): void {
  const d = dirname(resolve(file));
  if (!fs.existsSync(d)) throw new CliError('NOT_FOUND', `the directory of --out ${file} (${d}) does not exist`);
}

export function register(program: Command): void {
  const mig = program.command('migrate').description("move a vTPM between managers (GET_MIG_KEY, LOAD_MIG_KEY, MIGRATE_OUT, MIGRATE_IN)");

  mig
    .command('key')
    .description("write this manager's public migration key (destination side; made at first use)")
    .requiredOption('--run <dir>', "the host's run directory (or its manager's)")
    .requiredOption('--out <file>', 'PEM public key file to write')
    .action(async (o: { run: string; out: string }) => {
      checkOutDir(o.out);
      const pub = await withManager(o.run, Ord.GET_MIG_KEY, 'the migration key', async (c) => publicKeyFrom(await c.migrationKey()));
      writeFileAtomic(o.out, pub.export({ format: 'pem', type: 'spki' }));
      process.stdout.write(`${fingerprint(pub).toString('hex')}\n`);
    });

  mig
    .command('out')
    .description("seal a VM's vTPM state to a destination key (source side); the VM is then refused here until deleted")
    .requiredOption('--run <dir>', "the source host's run directory (or its manager's)")
    .option('--vm <uuid>', 'the VM whose vTPM moves')
    .option('--instance <n>', 'or its instance number', (v) => Number(v))
    .requiredOption('--to-key <file>', "the destination manager's key (from `vtpm migrate key`)")
    .option('--name <name>', 'name the key is loaded under (Xen: the destination address); default: key-<fingerprint>')
    .requiredOption('--out <file>', 'blob file to write')
    .option('--force', "migrate a VM whose guest is attached: its vTPM here can no longer save, so the guest's next commands fail")
    .action(async (o: { run: string; vm?: string; instance?: number; toKey: string; name?: string; out: string; force?: boolean }) => {
      if ((o.vm === undefined) === (o.instance === undefined)) throw new CliError('USAGE', 'give exactly one of --vm UUID and --instance N');
      if (o.vm !== undefined && !isUuid(o.vm.toLowerCase())) throw new CliError('USAGE', `--vm takes a uuid, not ${o.vm}`);
      if (o.instance !== undefined && !(Number.isInteger(o.instance) && o.instance > 0)) throw new CliError('USAGE', '--instance takes a positive integer');
      const key = readKeyFile(o.toKey);
      checkOutDir(o.out);
      if (o.vm !== undefined) {
        const g = attachedGuest(o.run, o.vm.toLowerCase());
        if (g && !o.force) {
          throw new CliError(
            'CONFLICT',
            `VM ${o.vm} is attached to dom${g.domid}${g.suspended ? ' (suspended)' : ''}: detach it first (\`vtpm guest detach --domid ${g.domid}\`), or --force to send it anyway (its vTPM here can no longer save, so the guest's next commands fail)`,
          );
        }
        if (g) process.stderr.write(`vtpm migrate out: --force: dom${g.domid} stays attached; its vTPM can no longer save here and its next commands fail\n`);
      }
      const name = o.name ?? `key-${fingerprint(key).toString('hex').slice(0, 16)}`;
      const what = o.vm !== undefined ? `VM ${o.vm.toLowerCase()}` : `instance ${o.instance}`;
      const blob = await withManager(o.run, Ord.MIGRATE_OUT, what, async (c) => {
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
    .requiredOption('--run <dir>', "the destination host's run directory (or its manager's)")
    .requiredOption('--blob <file>', 'blob file from `vtpm migrate out`')
    .option('--instance <n>', 'instance number to give it (default: the lowest free one)', (v) => Number(v), 0)
    .action(async (o: { run: string; blob: string; instance: number }) => {
      if (!(Number.isInteger(o.instance) && o.instance >= 0)) throw new CliError('USAGE', '--instance takes a non-negative integer');
      const blob = readBlobFile(o.blob);
      const instance = await withManager(o.run, Ord.MIGRATE_IN, `the blob ${o.blob}`, (c) => c.migrateIn(blob, o.instance));
      process.stdout.write(`vm ${readBlobHeader(blob).vmUuid}: instance ${instance}\n`);
    });

  mig
    .command('show')
    .description("print a blob's clear header (VM, counter, keys); decrypts nothing")
    .requiredOption('--blob <file>', 'blob file')
    .action((o: { blob: string }) => {
      let h: ReturnType<typeof readBlobHeader>;
      try {
        h = readBlobHeader(readBlobFile(o.blob));
      } catch (err) {
        if (err instanceof CliError) throw err;
        throw new CliError('USAGE', `${o.blob} is not a migration blob (${(err as Error).message})`);
      }
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
