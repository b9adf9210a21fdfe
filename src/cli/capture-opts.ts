// `--pcap FILE [--pcap-max-mb N]` of `guest attach` and `qemu attach`: checked here, then handed to the
// backend as keys of the device's backend node (`capture`, `capture-max-mb`), which only dom0 can
// write; the backend writes the file (docs/observability.md).
import fs from 'node:fs';
import { dirname, resolve } from 'node:path';
import { CliError } from './errors.js';

export const DEFAULT_PCAP_MAX_MB = 100;

/** The backend keys for a capture to `pcap` bounded at `maxMb` MiB, or {} without one. */
export function captureKeys(pcap: string | undefined, maxMb: number | undefined): Record<string, string> {
  if (pcap === undefined) {
    if (maxMb !== undefined) throw new CliError('USAGE', '--pcap-max-mb needs --pcap FILE');
    return {};
  }
  const mb = maxMb ?? DEFAULT_PCAP_MAX_MB;
  if (!Number.isInteger(mb) || mb < 1 || mb > 1_000_000) throw new CliError('USAGE', `--pcap-max-mb takes a whole number of MiB (1..1000000), not ${String(maxMb)}`);
  const file = resolve(pcap);
  let dir: fs.Stats;
  try {
    dir = fs.statSync(dirname(file));
  } catch {
    throw new CliError('USAGE', `--pcap ${pcap}: directory ${dirname(file)} does not exist`);
  }
  if (!dir.isDirectory()) throw new CliError('USAGE', `--pcap ${pcap}: ${dirname(file)} is not a directory`);
  if (fs.existsSync(file) && !fs.statSync(file).isFile()) throw new CliError('USAGE', `--pcap ${pcap}: exists and is not a regular file`);
  return { capture: file, 'capture-max-mb': String(mb) };
}
