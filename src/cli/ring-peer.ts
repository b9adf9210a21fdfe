// One end of the ring echo (src/xen/echo-front.ts, echo-back.ts) as a process of its own, driven over
// its IPC channel by `vtpm ring-demo`, the ring tests and `npm run bench -- ring`:
// `node dist/src/cli/ring-peer.js back DOMID | front DOMID BACKDOMID`. The backend process also serves
// the bench's peer, a UNIX-socket echo of the same 16-byte messages.
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { Domain, ECHO_SLOT, EchoBackend, EchoFrontend, type RingOffer } from '../xen/index.js';

/** A UNIX-socket echo of the same 16-byte messages: the peer every ring figure is compared with. */
export function socketEchoServer(path: string): Promise<net.Server> {
  const server = net.createServer((sock) => {
    sock.setNoDelay?.(true);
    let carry: Buffer | null = null;
    sock.on('data', (chunk: Buffer) => {
      // Answer every whole 16-byte message with value+1, like the ring backend; keep a split one.
      const buf = carry ? Buffer.concat([carry, chunk]) : chunk;
      const whole = buf.length - (buf.length % ECHO_SLOT);
      const out = Buffer.allocUnsafe(whole);
      for (let o = 0; o < whole; o += ECHO_SLOT) {
        out.writeUInt32LE(buf.readUInt32LE(o), o);
        out.writeUInt32LE(0, o + 4);
        out.writeUInt32LE((buf.readUInt32LE(o + 8) + 1) >>> 0, o + 8);
        out.writeUInt32LE(0, o + 12);
      }
      carry = whole < buf.length ? Buffer.from(buf.subarray(whole)) : null;
      if (whole > 0) sock.write(out);
    });
    sock.on('error', () => sock.destroy());
  });
  return new Promise((resolve) => server.listen(path, () => resolve(server)));
}

type ParentMsg =
  | { kind: 'offer'; offer: RingOffer }
  | { kind: 'disconnect'; frontDomid: number }
  | { kind: 'echo-socket'; path: string }
  | { kind: 'run'; count: number; inflight: number }
  | { kind: 'garbage-indices' }
  | { kind: 'revoke' }
  | { kind: 'exit' };

async function main(role: string, domid: number, backDomid: number): Promise<void> {
  const dom = await Domain.create({ domid });
  const send = (m: object): void => void process.send?.(m);
  let backend: EchoBackend | undefined;
  let front: EchoFrontend | undefined;
  if (role === 'back') {
    backend = new EchoBackend(dom);
    backend.onReject = (fd, reason) => send({ kind: 'rejected', frontDomid: fd, reason });
    send({ kind: 'ready', domid });
  } else {
    front = new EchoFrontend(dom, backDomid);
    send({ kind: 'ready', domid, offer: front.offer() });
  }
  process.on('message', (m: ParentMsg) => {
    void (async () => {
      try {
        switch (m.kind) {
          case 'offer':
            backend!.connect(m.offer);
            send({ kind: 'connected', frontDomid: m.offer.frontDomid });
            break;
          case 'disconnect':
            backend!.disconnect(m.frontDomid);
            send({ kind: 'disconnected', frontDomid: m.frontDomid });
            break;
          case 'echo-socket':
            await socketEchoServer(m.path);
            send({ kind: 'listening', path: m.path });
            break;
          case 'run': {
            const f = front!;
            let done = 0;
            let bad = 0;
            let issued = 0;
            await new Promise<void>((resolve) => {
              const issue = (): void => {
                while (issued < m.count && issued - done < m.inflight) {
                  const v = issued++;
                  void f.request(v, true).then((r) => {
                    if (r !== ((v + 1) >>> 0)) bad++;
                    if (++done === m.count) resolve();
                    else issue();
                  });
                }
                f.flush();
              };
              issue();
            });
            send({ kind: 'ran', count: done, bad });
            break;
          }
          case 'garbage-indices': {
            // A hostile frontend: claim far more requests than the ring holds.
            const f = front!;
            Atomics.store(f.ring.sring.idx, 0, (f.ring.reqProdPvt + 100_000) >>> 0);
            f.dom.evtchn.send(f.port);
            send({ kind: 'garbage-sent' });
            break;
          }
          case 'revoke':
            send({ kind: 'revoked', ok: front!.dom.grants.endAccess(front!.ref) });
            break;
          case 'exit':
            await dom.destroy();
            process.exit(0);
        }
      } catch (err) {
        send({ kind: 'error', message: err instanceof Error ? err.message : String(err) });
      }
    })();
  });
  process.on('disconnect', () => {
    void dom.destroy().then(() => process.exit(0));
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [role, domid, backDomid] = process.argv.slice(2);
  if ((role !== 'back' && role !== 'front') || !domid) {
    console.error('usage: ring-peer back DOMID | front DOMID BACKDOMID');
    process.exit(2);
  }
  void main(role, Number(domid), Number(backDomid ?? 0));
}
