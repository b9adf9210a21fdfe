// QEMU's side of an endpoint in a process of its own, for tests that measure the endpoint's process:
// one line on stdin per request, one line of hex on stdout per reply, printed `argv[3]` ms after the
// reply arrived (so the endpoint's process has nothing to read meanwhile).
//   ctrl HEX N   write HEX on the control socket, print the N-byte reply
//   datafd       hand the endpoint a data channel (CMD_SET_DATAFD), print the 4-byte reply
//   data HEX     send one TPM command on the data channel, print its response
import net from 'node:net';
import readline from 'node:readline';
import { closeFd, sendWithFds, socketPair } from '../../dist/native/unix-rights.js';

const ctrl = await new Promise((resolve, reject) => {
  const s = net.connect(process.argv[2], () => resolve(s));
  s.once('error', reject);
});
let buf = Buffer.alloc(0);
let want = null;
let data = null;
let dbuf = Buffer.alloc(0);
let dwant = false;
const delayMs = Number(process.argv[3] ?? 0);
const print = (hex) => setTimeout(() => process.stdout.write(hex + '\n'), delayMs);
const check = () => {
  if (want !== null && buf.length >= want) {
    print(buf.subarray(0, want).toString('hex'));
    buf = buf.subarray(want);
    want = null;
  }
  if (dwant && dbuf.length >= 10 && dbuf.length >= dbuf.readUInt32BE(2)) {
    const n = dbuf.readUInt32BE(2);
    print(dbuf.subarray(0, n).toString('hex'));
    dbuf = dbuf.subarray(n);
    dwant = false;
  }
};
ctrl.on('data', (d) => ((buf = Buffer.concat([buf, d])), check()));
for await (const line of readline.createInterface({ input: process.stdin })) {
  const [op, hex, n] = line.trim().split(/\s+/);
  if (op === 'ctrl') {
    want = Number(n);
    ctrl.write(Buffer.from(hex, 'hex'));
  } else if (op === 'datafd') {
    const [mine, theirs] = socketPair();
    want = 4;
    sendWithFds(ctrl._handle.fd, Buffer.from('00000010', 'hex'), [theirs]);
    closeFd(theirs);
    data = new net.Socket({ fd: mine, readable: true, writable: true });
    data.on('data', (d) => ((dbuf = Buffer.concat([dbuf, d])), check()));
  } else if (op === 'data') {
    dwant = true;
    data.write(Buffer.from(hex, 'hex'));
  }
}
data?.destroy();
ctrl.destroy();
