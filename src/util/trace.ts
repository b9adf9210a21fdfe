// VTPM_TRACE_DIR=dir: a process appends timestamped events to dir/<pid>.trace, for a timeline of one
// operation across processes (xenstored, backend, manager, guest). Stamps are CLOCK_MONOTONIC
// nanoseconds (process.hrtime), the same clock in every process. Lines are buffered and written at exit
// and every 200 ms, so tracing itself costs no syscall on the measured path.
import fs from 'node:fs';
import { join } from 'node:path';
import { escapeLogLine } from './log-escape.js';

const dir = process.env.VTPM_TRACE_DIR;
/** Whether VTPM_TRACE_DIR is set (callers skip building trace text otherwise). */
export const tracing = dir !== undefined && dir !== '';
const lines: string[] = [];

function flush(): void {
  if (!lines.length) return;
  try {
    fs.appendFileSync(join(dir!, `${process.pid}.trace`), lines.join('\n') + '\n');
  } catch {
    // a diagnostic: never take the process down
  }
  lines.length = 0;
}

if (tracing) {
  fs.mkdirSync(dir!, { recursive: true });
  lines.push(`${process.hrtime.bigint()} start ${process.argv.slice(1).join(' ')}`);
  setInterval(flush, 200).unref();
  process.on('exit', flush);
}

/** Record one event (a no-op unless tracing). */
export function trace(what: string): void {
  // events quote guest bytes (xs_wire payloads): one line each, escaped like every log line
  if (tracing) lines.push(`${process.hrtime.bigint()} ${escapeLogLine(what)}`);
}
