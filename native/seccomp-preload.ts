// Loaded with `node --import` ahead of a domain's own code (src/cli/isolation.ts): the domain process
// gets its seccomp filter before any line of it runs, and does not run at all without it.
import { installDomainFilter } from './seccomp.js';

try {
  if (!installDomainFilter()) process.stderr.write(`vtpm: no seccomp filter for ${process.arch}; the domain runs without one\n`);
} catch (err) {
  process.stderr.write(`vtpm: ${(err as Error).message}; refusing to run the domain unfiltered\n`);
  process.exit(1);
}
