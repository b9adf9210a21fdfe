// Child of spares.test.ts: makes instance <n> from a spare TPM on a directory store, asks it for a
// primary key (the first response any caller sees: create's own Startup is not released), writes that
// response to stdout and kills itself with SIGKILL at once, so nothing after the response can have
// made the state durable. Run from the compiled tree (dist/).
import { writeSync } from 'node:fs';
import { DirStateStore } from '../../dist/src/tpm/dir-store.js';
import { TpmHost } from '../../dist/src/tpm/host.js';
import * as tpm2 from '../../dist/src/tpm/tpm2-commands.js';

const [dir, n] = process.argv.slice(2);
const host = new TpmHost({ spares: 1 });
await host.sparesReady();
const store = await DirStateStore.open(dir);
const tpm = await host.create({ instance: Number(n), version: '2.0', store, startup: 'clear' });
const rsp = await tpm.execute(tpm2.createPrimaryRsa(2048));
writeSync(1, JSON.stringify({ fromSpare: tpm.fromSpare, rsp: Buffer.from(rsp).toString('hex') }) + '\n');
process.kill(process.pid, 'SIGKILL');
