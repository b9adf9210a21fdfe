// Entry point of a vTPM-domain process: `node dist/src/tpm/domain-main.js --instance N --domid D
// [--tpm-version 2.0|1.2] --state-dir DIR` (also `vtpm vtpm-domain …`). Frames on stdin/stdout, logs on
// stderr. Start it with engineEnv() so libuv's pool has the size the engine expects.
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { DirStateStore } from './dir-store.js';
import { runDomain, stdioTransport } from './domain.js';
import type { TpmVersion } from './wire.js';
import { escapeLogLine } from '../util/log-escape.js';

export interface DomainArgs {
  instance: number;
  domid: number;
  version: TpmVersion;
  stateDir: string;
}

export function parseDomainArgs(argv: string[]): DomainArgs {
  const { values } = parseArgs({
    args: argv,
    options: {
      instance: { type: 'string' },
      domid: { type: 'string' },
      'tpm-version': { type: 'string', default: '2.0' },
      'state-dir': { type: 'string' },
    },
    strict: true,
  });
  const instance = Number(values.instance);
  const domid = Number(values.domid);
  const version = values['tpm-version'];
  if (!Number.isInteger(instance) || instance < 0) throw new Error('--instance must be a non-negative integer');
  if (!Number.isInteger(domid) || domid < 1 || domid > 0x7fef) throw new Error('--domid must be 1..32751');
  if (version !== '2.0' && version !== '1.2') throw new Error('--tpm-version must be 2.0 or 1.2');
  if (!values['state-dir']) throw new Error('--state-dir is required');
  return { instance, domid, version, stateDir: values['state-dir'] };
}

/** Run a domain on this process's stdio; resolves with the exit code. */
export async function domainMain(args: DomainArgs): Promise<number> {
  const store = await DirStateStore.open(args.stateDir);
  return runDomain({ instance: args.instance, domid: args.domid, version: args.version, store, transport: stdioTransport() });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  domainMain(parseDomainArgs(process.argv.slice(2))).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`vtpm-domain: ${escapeLogLine(err instanceof Error ? err.message : String(err))}\n`);
      process.exit(1);
    },
  );
}
