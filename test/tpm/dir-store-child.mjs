// Child of dir-store.test.ts: writes states in <dir> until it is killed, printing one line per store()
// that resolved (an acknowledged write): "1 <i>" after instance 1's permanent blob became the 64 KiB
// blob filled with i % 251 (so a write spans 16 pages and a kill can tear it), and "<n> <i>" after a
// first write of instance n's permanent state (a spare file claimed, or a new file). Says "ready" first.
import { writeSync } from 'node:fs';
import { DirStateStore } from '../../dist/src/tpm/dir-store.js';

const [dir, base] = process.argv.slice(2);
const store = await DirStateStore.open(dir, { spares: 2 });
writeSync(1, 'ready\n');
for (let i = 1; ; i++) {
  await store.store(1, 'permanent', new Uint8Array(65536).fill(i % 251));
  writeSync(1, `1 ${i}\n`);
  if (i % 3 === 0) {
    const n = Number(base) + i;
    await store.store(n, 'permanent', new Uint8Array(1200).fill(i % 251));
    writeSync(1, `${n} ${i}\n`);
  }
}
