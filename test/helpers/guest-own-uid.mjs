// Child for the isolation test: a guest process under its own uid holding only its hypercall connection
// (VTPM_HV_FD): it shares a page read-only with dom0, offers an event channel, and tries dom0's objects.
import fs from 'node:fs';
import { Domain } from '../../dist/src/xen/index.js';
import { connectUnix } from '../../dist/native/unix-rights.js';
const [dir, domid] = process.argv.slice(2);
const dom = await Domain.create({ domid: Number(domid), dir });
const gfn = dom.allocFrames(1);
dom.frames(gfn).set(Buffer.from(`hello from dom${domid}`));
const ref = dom.grants.grantAccess(0, gfn, true);
const port = dom.evtchn.allocUnbound(0);
let events = 0;
dom.evtchn.on(port, () => process.send({ kind: 'event', n: ++events }));
const attempt = (f) => {
  try {
    f();
    return 'ok';
  } catch (err) {
    return err.code ?? `errno ${err.errno}`;
  }
};
const tried = {
  connectToolstack: attempt(() => connectUnix(`${dir}/hypervisor.sock`)),
  listDir: attempt(() => fs.readdirSync(dir)),
};
process.send({ kind: 'ready', ref, port, tried });
process.on('message', (m) => {
  if (m.kind === 'exit') process.exit(0);
});
