// A two-process ring echo: the smallest complete use of the hypervisor layer (grant a ring page, map
// it, bind an event channel, exchange requests). Used by the ring tests, `npm run bench -- ring` and
// `vtpm ring-demo`. Run as a child with an IPC channel: `node dist/scripts/ring-peer.js back|front`.
//
// Echo protocol: request slot {id u32, op u32, value u32, pad}; response {id u32, status u32,
// value+1 u32, pad}. 16-byte slots, so a one-page ring has 128 of them.
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { BackRing, Domain, FrontRing, RingError, SharedRing, type GrantMapping } from '../src/xen/index.js';

export const SLOT = 16;
export const OP_ECHO = 1;

export interface RingOffer {
  frontDomid: number;
  refs: number[];
  port: number;
}

/** Backend end: serves any number of frontends, each cut off alone if it misbehaves. */
export class EchoBackend {
  readonly dom: Domain;
  readonly #conns = new Map<number, { map: GrantMapping; port: number; ring: BackRing }>();
  onReject: (frontDomid: number, reason: string) => void = () => {};
  readonly #scratch = new Uint8Array(SLOT * 1024);
  readonly #scratchView = new DataView(this.#scratch.buffer);
  served = 0;

  constructor(dom: Domain) {
    this.dom = dom;
  }

  connect(offer: RingOffer): void {
    const map = this.dom.mapper.mapMany(offer.frontDomid, offer.refs);
    const ring = new BackRing(new SharedRing(map.buffer, SLOT));
    const port = this.dom.evtchn.bindInterdomain(offer.frontDomid, offer.port);
    this.#conns.set(offer.frontDomid, { map, port, ring });
    this.dom.evtchn.on(port, () => this.#service(offer.frontDomid));
  }

  #service(front: number): void {
    const c = this.#conns.get(front);
    if (!c) return;
    const { ring, port } = c;
    let notify = false;
    const dv = this.#scratchView;
    const out = ring.sring.view;
    try {
      do {
        const n = ring.takeRequestsInto(this.#scratch);
        for (let i = 0; i < n; i++) {
          const o = i * SLOT;
          const off = ring.nextResponseSlot();
          out.setUint32(off, dv.getUint32(o, true), true);
          out.setUint32(off + 4, dv.getUint32(o + 4, true) === OP_ECHO ? 0 : 1, true);
          out.setUint32(off + 8, (dv.getUint32(o + 8, true) + 1) >>> 0, true);
          ring.produceResponse();
          this.served++;
        }
        // Publish as we go so the frontend can refill while we keep working.
        if (ring.pushResponsesAndCheckNotify()) notify = true;
      } while (ring.finalCheckForRequests());
    } catch (err) {
      if (!(err instanceof RingError)) throw err;
      this.disconnect(front);
      this.onReject(front, `dom${front}: ${err.message}`);
      return;
    }
    if (notify) this.dom.evtchn.send(port);
  }

  disconnect(front: number): void {
    const c = this.#conns.get(front);
    if (!c) return;
    this.#conns.delete(front);
    this.dom.evtchn.close(c.port);
    c.map.unmap();
  }
}

/** Frontend end: owns the ring page, grants it, and keeps up to `inflight` requests outstanding. */
export class EchoFrontend {
  readonly dom: Domain;
  readonly ring: FrontRing;
  readonly gfn: number;
  readonly ref: number;
  readonly port: number;
  #waiters = new Map<number, (value: number) => void>();
  #nextId = 1;

  constructor(dom: Domain, backDomid: number) {
    this.dom = dom;
    this.gfn = dom.allocFrames(1);
    const page = dom.frames(this.gfn);
    const sring = new SharedRing(page.buffer as ArrayBuffer, SLOT, page.byteOffset, page.byteLength);
    sring.init();
    this.ring = new FrontRing(sring);
    this.ref = dom.grants.grantAccess(backDomid, this.gfn);
    this.port = dom.evtchn.allocUnbound(backDomid);
    dom.evtchn.on(this.port, () => this.#responses());
  }

  offer(): RingOffer {
    return { frontDomid: this.dom.domid, refs: [this.ref], port: this.port };
  }

  /** Queue one echo request; publish it now unless `batch` (then call flush()). */
  request(value: number, batch = false): Promise<number> {
    const id = this.#nextId++ >>> 0;
    const off = this.ring.nextRequestSlot();
    const v = this.ring.sring.view;
    v.setUint32(off, id, true);
    v.setUint32(off + 4, OP_ECHO, true);
    v.setUint32(off + 8, value >>> 0, true);
    this.ring.produceRequest();
    const p = new Promise<number>((resolve) => this.#waiters.set(id, resolve));
    if (!batch) this.flush();
    return p;
  }

  flush(): void {
    if (this.ring.pushRequestsAndCheckNotify()) this.dom.evtchn.send(this.port);
  }

  #responses(): void {
    const v = this.ring.sring.view;
    do {
      while (this.ring.unconsumedResponses() > 0) {
        const off = this.ring.responseSlot();
        const id = v.getUint32(off, true);
        const value = v.getUint32(off + 8, true);
        this.ring.consumeResponse();
        const w = this.#waiters.get(id);
        this.#waiters.delete(id);
        w?.(value);
      }
    } while (this.ring.finalCheckForResponses());
  }
}

/** A UNIX-socket echo of the same 16-byte messages: the peer every ring figure is compared with. */
export function socketEchoServer(path: string): Promise<net.Server> {
  const server = net.createServer((sock) => {
    sock.setNoDelay?.(true);
    sock.on('data', (chunk: Buffer) => {
      // Answer every whole 16-byte message with value+1, like the ring backend.
      const out = Buffer.allocUnsafe(chunk.length - (chunk.length % SLOT));
      for (let o = 0; o + SLOT <= chunk.length; o += SLOT) {
        out.writeUInt32LE(chunk.readUInt32LE(o), o);
        out.writeUInt32LE(0, o + 4);
        out.writeUInt32LE((chunk.readUInt32LE(o + 8) + 1) >>> 0, o + 8);
        out.writeUInt32LE(0, o + 12);
      }
      sock.write(out);
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
