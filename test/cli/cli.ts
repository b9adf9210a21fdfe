// The CLI as a user runs it (compiled, in a child process), with its exit status and both streams,
// and a throw-away host directory per test file.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../helpers/child.js';

export const exec = promisify(execFile);
const cli = join(ROOT, 'dist/src/cli/main.js');

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

export async function vtpm(...args: string[]): Promise<Result> {
  try {
    const r = await exec(process.execPath, [cli, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1' } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** `vtpm …` that must succeed; its stdout. */
export async function ok(...args: string[]): Promise<string> {
  const r = await vtpm(...args);
  if (r.code !== 0) throw new Error(`vtpm ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

export const tcti = (port: number): NodeJS.ProcessEnv => ({ ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${port}` });

/** tpm2_getrandom through a guest's TCTI bridge (after a Startup, which a started TPM refuses harmlessly). */
export async function getRandom(port: number): Promise<string> {
  await exec('tpm2_startup', ['-c'], { env: tcti(port) }).catch((err: unknown) => {
    if (!/0x0*100\b/.test(String((err as { stderr?: string }).stderr))) throw err;
  });
  const { stdout } = await exec('tpm2_getrandom', ['--hex', '8'], { env: tcti(port) });
  return stdout.trim();
}

export interface StatusJson {
  mode: string;
  dead: string[];
  processes: Array<{ role: string; domid: number; pid: number; alive: boolean; state: string; vm?: string; serves?: number; instance?: number }>;
}

export async function status(runDir: string): Promise<{ code: number; json: StatusJson }> {
  const r = await vtpm('host', 'status', '--run', runDir, '--json');
  return { code: r.code, json: JSON.parse(r.stdout) as StatusJson };
}

/** Wait until `pid` is gone (a SIGKILLed daemon is reaped by init shortly after). */
export async function gone(pid: number): Promise<void> {
  for (let i = 0; i < 500; i++) {
    try {
      process.kill(pid, 0);
      const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (/\) Z /.test(st)) return;
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`pid ${pid} still alive`);
}
