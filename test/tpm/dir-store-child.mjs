// Child of dir-store.test.ts: overwrites instance 1's permanent blob in <dir> with alternating blobs A
// and B (64 KiB each, so a write takes several syscalls) until it is killed; says "ready" after the
// first store resolved.
import { writeSync } from 'node:fs';
import { DirStateStore } from '../../dist/src/tpm/dir-store.js';

const store = new DirStateStore(process.argv[2]);
const a = new Uint8Array(65536).fill(0xaa);
const b = new Uint8Array(65536).fill(0xbb);
await store.store(1, 'permanent', a);
writeSync(1, 'ready\n');
for (let i = 0; ; i++) await store.store(1, 'permanent', i % 2 ? a : b);
