// The hypervisor process started on demand for a directory nobody started one for (a test, a single
// guest tool): `node hypervisor-main.js DIR`. It exits by itself once it has had no domain and no
// toolstack connection for a few seconds. A host started with `vtpm host up` runs `vtpm hypervisor`.
import fs from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Hypervisor, claimPidFile } from './hypervisor.js';

const IDLE_EXIT_MS = 3000;

export async function main(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (!claimPidFile(dir)) return;
  const pidFile = join(dir, 'hypervisor.pid');
  const hv = new Hypervisor({
    dir,
    idleExitMs: IDLE_EXIT_MS,
    onIdle: () => {
      void hv.close().then(() => {
        fs.rmSync(pidFile, { force: true });
        process.exit(0);
      });
    },
  });
  await hv.listen();
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      void hv.close().then(() => {
        fs.rmSync(pidFile, { force: true });
        process.exit(0);
      });
    });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv[2] ?? '').catch((err: unknown) => {
    process.stderr.write(`hypervisor: ${(err as Error).message}\n`);
    process.exit(1);
  });
}
