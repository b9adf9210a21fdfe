// Child for the ring-poll tests: a guest domain in a process of its own with a RingFront to domain 0.
// It sends its offer, then on {kind:'run', count, command(hex)} sends the command `count` times, each
// after the previous answer, and replies {kind:'ran', bad}. Its own poll is off (pollUs 0) unless told.
import { Domain } from '../../dist/src/xen/index.js';
import { RingFront } from '../../dist/src/tpmif/ring-front.js';
const [dir, domid, pollUs] = process.argv.slice(2);
const dom = await Domain.create({ domid: Number(domid), dir });
const front = new RingFront(dom, 0, { pollUs: Number(pollUs ?? 0) });
process.send({ kind: 'ready', offer: { frontDomid: dom.domid, refs: [...front.refs], port: front.port } });
process.on('message', async (m) => {
  if (m.kind === 'run') {
    const command = Buffer.from(m.command, 'hex');
    let bad = 0;
    for (let i = 0; i < m.count; i++) {
      const r = await front.transmit(command);
      if (r.length < 10 || r[6] | r[7] | r[8] | r[9]) bad++;
    }
    process.send({ kind: 'ran', bad });
  } else if (m.kind === 'exit') {
    await front.close();
    await dom.destroy();
    process.exit(0);
  }
});
