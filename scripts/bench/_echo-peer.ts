// The xenstore bench's peer: a UNIX-socket server speaking the same 16-byte framing that answers each
// frame at once with a frame of the size the request asks for (in its tx_id field) — the cost of the
// socket round trip and framing alone, with the daemon's message sizes. Run as a child process:
// `node _echo-peer.js SOCKET`; prints "ready" when listening.
import net from 'node:net';
import fs from 'node:fs';
import { XsReceiver, encodeMessage } from '../../src/xenstore/wire.js';

const socketPath = process.argv[2];
if (!socketPath) throw new Error('usage: _echo-peer.js SOCKET');
try {
  fs.unlinkSync(socketPath);
} catch {
  // not there
}
const server = net.createServer((s) => {
  s.setNoDelay?.(true);
  const rx = new XsReceiver((m) => s.write(encodeMessage(m.type, m.reqId, 0, Buffer.alloc(m.txId))));
  s.on('data', (b: Buffer) => rx.push(b));
  s.on('error', () => s.destroy());
});
server.listen(socketPath, () => process.stdout.write('ready\n'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
