// Child for the ring-poll tests: domain 0 in a process of its own serving one guest's ring with a
// RingChannel whose commands go to a real swtpm's data socket. On {kind:'offer', offer} it connects
// and replies {kind:'connected'} (with `poll` set, it polls for 5 ms whatever the CPU pressure; with
// `protocol: 'v2'` it serves the one-command page instead);
// {kind:'stats'} replies with its poll counters; {kind:'exit'} closes everything.
import net from 'node:net';
import { Domain } from '../../dist/src/xen/index.js';
import { RingChannel } from '../../dist/src/backend/ring-channel.js';
import { V2Channel } from '../../dist/src/backend/v2-channel.js';
const [dir, swtpmPath] = process.argv.slice(2);
const dom = await Domain.create({ domid: 0, dir });
const sock = net.connect(swtpmPath);
await new Promise((r, j) => sock.once('connect', r).once('error', j));
// swtpm answers in order: one waiter per command, each response framed by its header's size field.
const waiters = [];
let buf = Buffer.alloc(0);
sock.on('data', (d) => {
  buf = Buffer.concat([buf, d]);
  while (buf.length >= 6 && buf.length >= buf.readUInt32BE(2)) {
    const n = buf.readUInt32BE(2);
    waiters.shift()(new Uint8Array(buf.subarray(0, n)));
    buf = buf.subarray(n);
  }
});
const target = {
  execute: (c) => new Promise((resolve) => (waiters.push(resolve), sock.write(c))),
  cancel: () => {},
};
let ch;
process.send({ kind: 'ready' });
process.on('message', async (m) => {
  if (m.kind === 'offer') {
    const poll = m.poll ? { pollUs: 5000, pollContended: () => false } : {};
    const Channel = m.protocol === 'v2' ? V2Channel : RingChannel;
    ch = new Channel(dom, { ...m.offer, target, onFatal: () => {}, ...poll });
    process.send({ kind: 'connected' });
  } else if (m.kind === 'stats') {
    process.send({ kind: 'stats', polled: ch.polled, stoodAside: ch.stoodAside });
  } else if (m.kind === 'exit') {
    ch?.close();
    sock.destroy();
    await dom.destroy();
    process.exit(0);
  }
});
