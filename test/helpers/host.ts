// A host as the integration tests drive it: the compiled CLI in a child process, tpm2-tools aimed at
// a guest's TCTI bridge, the two well-behaved guests (v2 and ring) most hostile-input tests keep
// working beside the offender, and polling for a condition another process brings about.
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT } from './child.js';
import { freePortPair } from '../../src/cli/ports.js';

export const run = promisify(execFile);
const cli = join(ROOT, 'dist/src/cli/main.js');

/** `vtpm …` from the build; rejects (with stdout and stderr) on a non-zero exit. */
export const vtpm = (...args: string[]) => run(process.execPath, [cli, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1' } });

/** The environment that points tpm2-tools at a guest's TCTI data port. */
export const tcti = (port: number): NodeJS.ProcessEnv => ({ ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` });

/** Poll `f` until it yields a value (a throw counts as not yet); fails naming `what` after `ms`. */
/** `vtpm migrate key/out/in` of one VM from host run dir `from` to `to`, files in `work`; `migrate in`'s stdout. */
export async function migrateVm(from: string, to: string, vm: string, work: string): Promise<string> {
  const key = join(work, 'b.pem');
  const blob = join(work, 'vm.mig');
  await vtpm('migrate', 'key', '--run', join(to, 'manager'), '--out', key);
  await vtpm('migrate', 'out', '--run', join(from, 'manager'), '--vm', vm, '--to-key', key, '--out', blob);
  return (await vtpm('migrate', 'in', '--run', join(to, 'manager'), '--blob', blob)).stdout;
}

export async function until<T>(f: () => Promise<T | undefined>, what: string, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

export interface GoodGuest {
  domid: number;
  port: number;
  protocol: 'v2' | 'ring';
}

/**
 * dom1 over the v2 page and dom2 over the ring, attached to the host in `runDir` and started
 * (tpm2_startup), as the guests a hostile-input test shows unharmed.
 */
export async function attachGoodGuests(runDir: string): Promise<GoodGuest[]> {
  const good: GoodGuest[] = [];
  for (const [domid, protocol] of [
    [1, 'v2'],
    [2, 'ring'],
  ] as const) {
    const port = await freePortPair();
    await vtpm('guest', 'attach', '--run', runDir, '--domid', String(domid), '--vm', randomUUID(), '--protocol', protocol, '--tcti-port', String(port));
    await run('tpm2_startup', ['-c'], { env: tcti(port) });
    good.push({ domid, port, protocol });
  }
  return good;
}
