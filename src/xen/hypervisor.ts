// The hypervisor process of a host (docs/hypervisor.md): it owns every domain's memory and the tables
// Xen keeps to itself, and answers hypercalls (hypercall.ts). A domain is one connection: the hypervisor
// creates a socketpair when dom0's toolstack creates the domain, keeps one end and hands the other to
// the creator, who passes it to the domain's process. Whatever arrives on that end is that domain's
// request; nothing a request says can make it another domain. The domain is destroyed when its end
// closes (its process died or closed it): its pins on others' grants are released, its ports closed.
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { sendWithFds, closeFd, socketPair } from '../../native/unix-rights.js';
import { raiseFdLimit } from '../../native/libc.js';
import { Channel, CHANNEL_OBJECTS, ECS_interdomain, ECS_unbound, HvDomain, type Port } from './hv-domain.js';
import { EEXIST, EINVAL, ENOMEM, ENOSPC, EPERM, ESRCH, HC, HC_MSG, HC_NAMES, POPULATE_MAX, encodeReply, hypervisorSocket } from './hypercall.js';
import { EVTCHN_PORTS_PER_PAGE, MAX_EVTCHN_PAGES, type DomainGeometry } from './layout.js';
import { GNTST } from './grant-table.js';
import { processAlive } from '../util/proc.js';
import { hypervisorMetrics } from '../util/metrics.js';
import { trace, tracing } from '../util/trace.js';

export { hypervisorSocket };

const MAX_DOMID = 0x7fef;
const MAX_GRANT_FRAMES = 16;
const MAX_PAGES = 1 << 16;

interface Answer {
  status: number;
  r?: number[];
  fds?: number[];
  /** Descriptors to close once sent (reopened read-only ones). */
  own?: number[];
}

export interface HypervisorOptions {
  dir: string;
  log?: (line: string) => void;
  /** Exit (close) after this long with no domain and no control connection (0: never). */
  idleExitMs?: number;
  onIdle?: () => void;
}

export class Hypervisor {
  readonly dir: string;
  readonly #domains = new Map<number, HvDomain>();
  readonly #conns = new Map<number, net.Socket>();
  readonly #controls = new Set<net.Socket>();
  #server: net.Server | null = null;
  readonly #o: HypervisorOptions;
  #idleTimer: NodeJS.Timeout | null = null;

  constructor(o: HypervisorOptions) {
    this.#o = o;
    this.dir = o.dir;
  }

  get domains(): number[] {
    return [...this.#domains.keys()];
  }

  async listen(): Promise<void> {
    // One descriptor per populated frame and five per channel: bounded per domain, not per host.
    raiseFdLimit(1 << 20);
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const path = hypervisorSocket(this.dir);
    fs.rmSync(path, { force: true });
    const server = net.createServer((sock) => this.#control(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    // Only dom0 (the socket's owner) may create domains.
    fs.chmodSync(path, 0o600);
    this.#server = server;
    this.#checkIdle();
  }

  /** A toolstack connection: it may create domains, nothing else. */
  #control(sock: net.Socket): void {
    this.#controls.add(sock);
    this.#checkIdle();
    this.#frames(sock, (op, a) => {
      if (op === HC.domctl_getinfo) return { status: this.#domains.has(a[0]!) ? 0 : -ESRCH };
      if (op !== HC.domctl_create) return { status: -EPERM };
      return this.#create(a);
    });
    sock.on('close', () => {
      this.#controls.delete(sock);
      this.#checkIdle();
    });
  }

  /** Read 32-byte requests off `sock` and answer each, with descriptors, on the same socket. */
  #frames(sock: net.Socket, handle: (op: number, a: number[]) => Answer): void {
    let carry = Buffer.alloc(0);
    sock.on('data', (chunk: Buffer) => {
      let buf = carry.length ? Buffer.concat([carry, chunk]) : chunk;
      let off = 0;
      for (; off + HC_MSG <= buf.length; off += HC_MSG) {
        const op = buf.readUInt32LE(off);
        const a = [0, 1, 2, 3, 4, 5, 6].map((i) => buf.readUInt32LE(off + 4 + 4 * i));
        let ans: Answer;
        if (tracing) trace(`hv < ${HC_NAMES.get(op) ?? op}`);
        try {
          hypervisorMetrics().hypercalls.inc({ op: HC_NAMES.get(op) ?? 'unknown' });
          ans = handle(op, a);
        } catch (err) {
          this.#o.log?.(`hypercall ${op} failed: ${(err as Error).message}`);
          ans = { status: -EINVAL };
        }
        const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
        try {
          sendWithFds(fd, encodeReply(ans.status, ans.r ?? [], ans.fds?.length ?? 0), ans.fds ?? []);
        } catch (err) {
          // A caller that does not read its replies is cut off.
          this.#o.log?.(`reply failed: ${(err as Error).message}; closing the connection`);
          sock.destroy();
        } finally {
          for (const o of ans.own ?? []) closeFd(o);
        }
        if (tracing) trace(`hv > ${HC_NAMES.get(op) ?? op} ${ans.status}`);
        if (sock.destroyed) return;
      }
      carry = Buffer.from(buf.subarray(off));
      buf = chunk;
    });
    sock.on('error', () => sock.destroy());
  }

  #create(a: number[]): Answer {
    const [domid, nrPages, grantFrames, maxPorts] = a as [number, number, number, number];
    const g: DomainGeometry = { nrPages, grantFrames, evtchnPages: Math.ceil(maxPorts / EVTCHN_PORTS_PER_PAGE) };
    if (
      domid > MAX_DOMID ||
      nrPages < 1 ||
      nrPages > MAX_PAGES ||
      grantFrames < 1 ||
      grantFrames > MAX_GRANT_FRAMES ||
      maxPorts < 2 ||
      maxPorts > MAX_EVTCHN_PAGES * EVTCHN_PORTS_PER_PAGE
    ) {
      return { status: -EINVAL };
    }
    if (this.#domains.has(domid)) return { status: -EEXIST };
    const d = new HvDomain(domid, g, maxPorts);
    const [mine, theirs] = socketPair();
    const sock = new net.Socket({ fd: mine, readable: true, writable: true });
    this.#domains.set(domid, d);
    this.#conns.set(domid, sock);
    this.#frames(sock, (op, args) => this.#hypercall(d, op, args));
    sock.on('close', () => this.#destroy(d));
    this.#o.log?.(`dom${domid} created (${nrPages} pages, ${grantFrames} grant frames, ${maxPorts} ports)`);
    this.#checkIdle();
    return { status: 0, r: [domid], fds: [theirs], own: [theirs] };
  }

  #hypercall(d: HvDomain, op: number, a: number[]): Answer {
    if (this.#domains.get(d.domid) !== d) return { status: -ESRCH };
    switch (op) {
      case HC.domain_info:
        return { status: 0, r: [d.domid, d.geometry.nrPages, d.geometry.grantFrames, d.maxPorts], fds: [d.controlFd] };
      case HC.populate: {
        const [gfn, count] = a as [number, number];
        if (count < 1 || count > POPULATE_MAX || gfn + count > d.geometry.nrPages) return { status: -EINVAL };
        const fds: number[] = [];
        for (let i = 0; i < count; i++) {
          const fd = d.frame(gfn + i, true);
          if (fd === null) return { status: -ENOMEM };
          fds.push(fd);
        }
        return { status: 0, fds };
      }
      case HC.decrease_reservation: {
        const [gfn, count] = a as [number, number];
        if (count < 1 || gfn + count > d.geometry.nrPages) return { status: -EINVAL };
        for (let i = gfn; i < gfn + count; i++) d.release(i);
        return { status: 0 };
      }
      case HC.map_grant:
        return this.#map(d, a[0]!, a[1]!, a[2] !== 0);
      case HC.unmap_grant: {
        const m = d.handles.get(a[0]!);
        if (!m) return { status: GNTST.bad_handle };
        d.handles.delete(a[0]!);
        // A granter since destroyed took its entries with it.
        if (this.#domains.get(m.g.domid) === m.g) m.g.unpin(m.ref, m.ro);
        return { status: 0 };
      }
      case HC.evtchn_alloc_unbound: {
        const port = d.freePort();
        if (!port) return { status: -ENOSPC };
        if (d.objects + CHANNEL_OBJECTS > d.maxObjects) return { status: -ENOMEM };
        const chan = new Channel(d);
        const p: Port = { port, state: ECS_unbound, remoteDom: a[0]!, remotePort: 0, chan, end: 0 };
        chan.holder[0] = p;
        d.ports.set(port, p);
        return { status: 0, r: [port, 0], fds: [chan.page, ...chan.wakeFds(0)] };
      }
      case HC.evtchn_bind_interdomain:
        return this.#bind(d, a[0]!, a[1]!);
      case HC.evtchn_close: {
        const p = d.ports.get(a[0]!);
        if (!p) return { status: -EINVAL };
        this.#closePort(d, p);
        return { status: 0 };
      }
      case HC.evtchn_status: {
        const p = d.ports.get(a[0]!);
        if (!p) return { status: 0, r: [0, 0, 0] };
        return { status: 0, r: [p.state, p.remoteDom, p.remotePort] };
      }
      default:
        return { status: -EINVAL };
    }
  }

  #map(d: HvDomain, granter: number, ref: number, ro: boolean): Answer {
    const g = this.#domains.get(granter);
    if (!g) return { status: GNTST.bad_domain };
    const fd = g.pin(ref, d.domid, ro);
    if (fd < 0) return { status: fd };
    const handle = d.addHandle(g, ref, ro);
    if (!ro) return { status: 0, r: [handle], fds: [fd] };
    // A descriptor opened read-only: a PROT_WRITE shared mapping of it fails with EACCES whatever the
    // mapper does with it.
    let rofd: number;
    try {
      rofd = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDONLY | 0x80000);
    } catch {
      d.handles.delete(handle);
      g.unpin(ref, ro);
      return { status: GNTST.general_error };
    }
    return { status: 0, r: [handle], fds: [rofd], own: [rofd] };
  }

  #bind(d: HvDomain, remoteDom: number, remotePort: number): Answer {
    const r = this.#domains.get(remoteDom);
    if (!r) return { status: -ESRCH };
    const rp = r.ports.get(remotePort);
    if (!rp || rp.state !== ECS_unbound || rp.remoteDom !== d.domid) return { status: -EINVAL };
    const port = d.freePort();
    if (!port) return { status: -ENOSPC };
    const end = (1 - rp.end) as 0 | 1;
    const p: Port = { port, state: ECS_interdomain, remoteDom, remotePort, chan: rp.chan, end };
    rp.chan.holder[end] = p;
    d.ports.set(port, p);
    rp.state = ECS_interdomain;
    rp.remotePort = port;
    // The new port starts pending (Xen's bind): it covers sends made before the bind.
    rp.chan.setPending(end);
    return { status: 0, r: [port, end], fds: [rp.chan.page, ...rp.chan.wakeFds(end)] };
  }

  /** EVTCHNOP_close: the remote end of an interdomain channel goes back to unbound (for us). */
  #closePort(d: HvDomain, p: Port): void {
    d.ports.delete(p.port);
    p.chan.holder[p.end] = null;
    const other = p.chan.holder[1 - p.end];
    if (p.state === ECS_interdomain && other) {
      other.state = ECS_unbound;
      other.remotePort = 0;
    }
    if (!other) p.chan.destroy();
  }

  #destroy(d: HvDomain): void {
    if (this.#domains.get(d.domid) !== d) return;
    this.#domains.delete(d.domid);
    this.#conns.delete(d.domid);
    // Xen's gnttab_release_mappings: the pins a dead mapper held are dropped.
    for (const m of d.handles.values()) if (this.#domains.get(m.g.domid) === m.g) m.g.unpin(m.ref, m.ro);
    d.handles.clear();
    for (const p of [...d.ports.values()]) this.#closePort(d, p);
    d.destroy();
    this.#o.log?.(`dom${d.domid} destroyed`);
    this.#checkIdle();
  }

  #checkIdle(): void {
    const ms = this.#o.idleExitMs ?? 0;
    if (ms <= 0) return;
    if (this.#idleTimer) clearTimeout(this.#idleTimer);
    this.#idleTimer = null;
    if (this.#domains.size > 0 || this.#controls.size > 0) return;
    this.#idleTimer = setTimeout(() => this.#o.onIdle?.(), ms);
  }

  async close(): Promise<void> {
    if (this.#idleTimer) clearTimeout(this.#idleTimer);
    for (const s of this.#conns.values()) s.destroy();
    for (const s of this.#controls) s.destroy();
    const server = this.#server;
    this.#server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    fs.rmSync(hypervisorSocket(this.dir), { force: true });
  }
}

/** Claim DIR/hypervisor.pid; false when a live hypervisor already holds it. */
export function claimPidFile(dir: string): boolean {
  const path = join(dir, 'hypervisor.pid');
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
      fs.writeSync(fd, String(process.pid));
      fs.closeSync(fd);
      return true;
    } catch {
      let pid = 0;
      try {
        pid = Number(fs.readFileSync(path, 'latin1'));
      } catch {
        continue;
      }
      if (pid && processAlive(pid)) return false;
      fs.rmSync(path, { force: true });
    }
  }
  return false;
}

