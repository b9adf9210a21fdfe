// What the tests need to read guest-script.sh's results: its KEY=VALUE lines and the PCR 16 value
// its two extends must produce.
import { createHash } from 'node:crypto';

export function parseScriptOutput(out: string): Record<string, string> {
  return Object.fromEntries(out.split('\n').filter((l) => /^[a-z0-9]+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** PCR 16 after the script's extends of sha256('stage-one') and sha256('stage-two'), as tpm2_pcrread prints it. */
export function scriptPcrModel(): string {
  let pcr = Buffer.alloc(32);
  for (const s of ['stage-one', 'stage-two']) pcr = createHash('sha256').update(pcr).update(createHash('sha256').update(s).digest()).digest();
  return '0x' + pcr.toString('hex').toUpperCase();
}
