// guest-script.sh (the full tpm2-tools session a guest runs through its TCTI bridge), how to run it in
// every guest at once, and what each guest's results must be: its KEY=VALUE lines and the PCR 16 value
// its two extends must produce.
import { expect } from 'vitest';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../../helpers/child.js';

const run = promisify(execFile);

export function parseScriptOutput(out: string): Record<string, string> {
  return Object.fromEntries(out.split('\n').filter((l) => /^[a-z0-9]+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** PCR 16 after the script's extends of sha256('stage-one') and sha256('stage-two'), as tpm2_pcrread prints it. */
export function scriptPcrModel(): string {
  let pcr = Buffer.alloc(32);
  for (const s of ['stage-one', 'stage-two']) pcr = createHash('sha256').update(pcr).update(createHash('sha256').update(s).digest()).digest();
  return '0x' + pcr.toString('hex').toUpperCase();
}

/** Run guest-script.sh in every guest at once (each in work/dom<N>) and check what each must print. */
export async function expectGuestScripts(work: string, guests: ReadonlyArray<{ domid: number; port: number }>): Promise<void> {
  const results = await Promise.all(
    guests.map(async (g) => {
      const w = join(work, `dom${g.domid}`);
      fs.mkdirSync(w);
      const { stdout } = await run('bash', [join(ROOT, 'test/integration/e2e/guest-script.sh'), w, `dom${g.domid}`], {
        env: { ...process.env, TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${g.port}` },
      });
      return parseScriptOutput(stdout);
    }),
  );
  const model = scriptPcrModel();
  results.forEach((r, i) => {
    const d = guests[i]!.domid;
    expect(r.random).toMatch(/^[0-9a-f]{32}$/);
    expect(r.pcr16).toBe(model);
    expect(r.load).toBe('ok');
    expect(r.quote).toBe('verified');
    expect(r.nv).toBe(`hello from dom${d}`);
    expect(r.unsealed).toBe(`disk-key-dom${d}`);
    expect(r.done).toBe('1');
  });
}
