// A domain: a process with a domid and a memory file holding its grant table, event channel table and
// grantable frames. `Domain` is the local domain (the owner of the file); `PeerDomain` is another
// domain's file mapped so that this process can do what Xen does on that domain's behalf (pin grants,
// set event channels pending). Which domid a process is, is fixed when it creates its Domain.
import fs from 'node:fs';
import { mapShared, type Mapping } from '../../native/libc.js';
import {
  DEFAULT_GEOMETRY,
  DOMAIN_MAGIC,
  HDR_DOMID,
  HDR_EVTCHN_PORTS,
  HDR_GRANT_FRAMES,
  HDR_MAGIC,
  HDR_NR_PAGES,
  HDR_PID,
  HDR_VERSION,
  LAYOUT_VERSION,
  EVTCHN_PORTS_PER_PAGE,
  MAX_EVTCHN_PAGES,
  PAGE_SIZE,
  activeTableOffset,
  controlSize,
  evtchnOffset,
  fileSize,
  framesOffset,
  grantTableOffset,
  memoryPath,
  xenDir,
  type DomainGeometry,
} from './layout.js';
import { GrantTable, GrantMapper } from './grant-table.js';
import { EventChannels } from './event-channel.js';
import { processAlive } from './proc.js';

export const DOMID_SELF = 0x7ff0;
const MAX_DOMID = 0x7fef;
const MAX_GRANT_FRAMES = 16;
const MAX_PAGES = 1 << 16;

export class DomainError extends Error {
  constructor(
    readonly code: 'ESRCH' | 'EEXIST' | 'EINVAL' | 'ENOMEM',
    message: string,
  ) {
    super(message);
    this.name = 'DomainError';
  }
}

/** The control area of a domain (header, grant table, active entries, event channels) as typed views. */
export class ControlViews {
  readonly header: Uint32Array;
  /** grant_entry_v1 as u16 (flags at 4i, domid at 4i+1) … */
  readonly grant16: Uint16Array;
  /** … as i32 (flags|domid<<16 at 2i, frame at 2i+1) so flags and domid can be swapped in one CAS. */
  readonly grant32: Int32Array;
  /** Active entries: pins at 2i (reads low 16 bits, writes high 16 bits), pinning domid+1 at 2i+1. */
  readonly active: Int32Array;
  /** Event channel ports: state, remote_dom, remote_port, pending at 4p .. 4p+3. */
  readonly evtchn: Int32Array;
  readonly nrGrantEntries: number;
  /** Ports 1 .. nrPorts-1 exist (port 0 is never used, as in Xen). */
  readonly nrPorts: number;

  constructor(buf: ArrayBuffer, g: DomainGeometry) {
    const grantBytes = g.grantFrames * PAGE_SIZE;
    this.header = new Uint32Array(buf, 0, PAGE_SIZE / 4);
    this.grant16 = new Uint16Array(buf, grantTableOffset(g), grantBytes / 2);
    this.grant32 = new Int32Array(buf, grantTableOffset(g), grantBytes / 4);
    this.active = new Int32Array(buf, activeTableOffset(g), grantBytes / 4);
    this.evtchn = new Int32Array(buf, evtchnOffset(g), (g.evtchnPages * PAGE_SIZE) / 4);
    this.nrGrantEntries = grantBytes / 8;
    this.nrPorts = g.evtchnPages * EVTCHN_PORTS_PER_PAGE;
  }
}

export interface DomainOptions {
  domid: number;
  /** Hypervisor directory; defaults to VTPM_XEN_DIR or /dev/shm/vtpm-split. */
  dir?: string;
  geometry?: Partial<DomainGeometry>;
}

/** This process's own domain. */
export class Domain {
  readonly domid: number;
  readonly dir: string;
  readonly geometry: DomainGeometry;
  readonly path: string;
  readonly views: ControlViews;
  readonly grants: GrantTable;
  readonly mapper: GrantMapper;
  readonly evtchn: EventChannels;
  readonly #fd: number;
  #mapping: Mapping;
  readonly #frames: Uint8Array;
  readonly #used: Uint8Array;
  readonly #peers = new Map<number, PeerDomain>();
  #closed = false;

  private constructor(domid: number, dir: string, geometry: DomainGeometry, fd: number, mapping: Mapping) {
    this.domid = domid;
    this.dir = dir;
    this.geometry = geometry;
    this.path = memoryPath(dir, domid);
    this.#fd = fd;
    this.#mapping = mapping;
    this.views = new ControlViews(mapping.buffer, geometry);
    this.#frames = new Uint8Array(mapping.buffer, framesOffset(geometry), geometry.nrPages * PAGE_SIZE);
    this.#used = new Uint8Array(geometry.nrPages);
    this.grants = new GrantTable(this);
    this.mapper = new GrantMapper(this);
    this.evtchn = new EventChannels(this);
  }

  /** Create the domain's memory file and start receiving its event channel notifications. */
  static async create(opts: DomainOptions): Promise<Domain> {
    const { domid } = opts;
    if (!Number.isInteger(domid) || domid < 0 || domid > MAX_DOMID) {
      throw new DomainError('EINVAL', `domid ${domid} out of range 0..${MAX_DOMID}`);
    }
    const g: DomainGeometry = { ...DEFAULT_GEOMETRY, ...opts.geometry };
    if (
      g.grantFrames < 1 ||
      g.grantFrames > MAX_GRANT_FRAMES ||
      g.nrPages < 1 ||
      g.nrPages > MAX_PAGES ||
      g.evtchnPages < 1 ||
      g.evtchnPages > MAX_EVTCHN_PAGES
    ) {
      throw new DomainError('EINVAL', `bad geometry ${JSON.stringify(g)}`);
    }
    const dir = xenDir(opts.dir);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const path = memoryPath(dir, domid);
    claimStale(path, domid);
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch (err) {
      throw new DomainError('EEXIST', `domain ${domid} already exists in ${dir} (${(err as Error).message})`);
    }
    // A sparse file: frames cost memory only once touched.
    fs.ftruncateSync(fd, fileSize(g));
    const mapping = mapShared(fd, 0, fileSize(g), true);
    const header = new Uint32Array(mapping.buffer, 0, 16);
    header[HDR_VERSION] = LAYOUT_VERSION;
    header[HDR_DOMID] = domid;
    header[HDR_NR_PAGES] = g.nrPages;
    header[HDR_GRANT_FRAMES] = g.grantFrames;
    header[HDR_EVTCHN_PORTS] = g.evtchnPages * EVTCHN_PORTS_PER_PAGE;
    header[HDR_PID] = process.pid;
    // Magic last: a peer that sees it sees a complete header.
    Atomics.store(header, HDR_MAGIC, DOMAIN_MAGIC);
    const d = new Domain(domid, dir, g, fd, mapping);
    await d.evtchn.listen();
    return d;
  }

  /** Allocate `count` contiguous guest frames (zeroed); returns the first gfn. */
  allocFrames(count = 1): number {
    let run = 0;
    for (let gfn = 0; gfn < this.#used.length; gfn++) {
      run = this.#used[gfn] ? 0 : run + 1;
      if (run === count) {
        const first = gfn - count + 1;
        this.#used.fill(1, first, first + count);
        this.#frames.fill(0, first * PAGE_SIZE, (first + count) * PAGE_SIZE);
        return first;
      }
    }
    throw new DomainError('ENOMEM', `domain ${this.domid}: no ${count} free contiguous frames`);
  }

  freeFrames(gfn: number, count = 1): void {
    this.#used.fill(0, gfn, gfn + count);
  }

  /** A view of guest frames gfn .. gfn+count-1 (this domain's own memory). */
  frames(gfn: number, count = 1): Uint8Array {
    if (gfn < 0 || gfn + count > this.geometry.nrPages) throw new RangeError(`gfn ${gfn}+${count} out of range`);
    return this.#frames.subarray(gfn * PAGE_SIZE, (gfn + count) * PAGE_SIZE);
  }

  /**
   * Another domain's control area, opened once and cached; throws ESRCH when it does not exist.
   * `revalidate` re-checks that the cached file is still that domain's (it may have been destroyed and
   * re-created): done on map and bind, not on every send, which must stay cheap.
   */
  peer(domid: number, revalidate = false): PeerDomain {
    let p = this.#peers.get(domid);
    if (p && revalidate && !p.valid()) {
      p.close();
      this.#peers.delete(domid);
      p = undefined;
    }
    if (!p) {
      p = PeerDomain.open(this.dir, domid);
      this.#peers.set(domid, p);
    }
    return p;
  }

  /**
   * Forget a cached peer unless it is still the live domain it was: the same file at its path, and the
   * process that created it (its header's pid) alive. A restarted domain is a new process with a new
   * file, so this costs a stat and a /proc read where dropping would cost a re-open and map later.
   */
  revalidatePeer(domid: number): void {
    const p = this.#peers.get(domid);
    if (p && !(p.valid() && processAlive(p.views.header[HDR_PID]!))) this.dropPeer(domid);
  }

  /** Forget a peer (its domain was destroyed); the next peer() call re-opens it. */
  dropPeer(domid: number): void {
    this.#peers.get(domid)?.close();
    this.#peers.delete(domid);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Stop receiving events and release mappings; the memory file stays (as a paused domain). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.evtchn.shutdown();
    this.mapper.unmapAll();
    for (const p of this.#peers.values()) p.close();
    this.#peers.clear();
    this.#mapping.unmap();
    fs.closeSync(this.#fd);
  }

  /** Close and remove the domain from the host, as the toolstack destroying it. */
  async destroy(): Promise<void> {
    await this.close();
    fs.rmSync(this.path, { force: true });
    this.evtchn.removeSocket();
  }
}

/** Remove a memory file left by a domain whose process is gone, so its domid can be reused. */
function claimStale(path: string, domid: number): void {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch {
    return;
  }
  try {
    const hdr = Buffer.alloc(32);
    fs.readSync(fd, hdr, 0, 32, 0);
    const pid = hdr.readUInt32LE(HDR_PID * 4);
    if (pid !== 0 && pid !== process.pid && processAlive(pid)) {
      throw new DomainError('EEXIST', `domain ${domid} is owned by live process ${pid}`);
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.rmSync(path, { force: true });
}


/** Another domain's memory file, with its control area mapped and its frames mappable page by page. */
export class PeerDomain {
  readonly domid: number;
  readonly geometry: DomainGeometry;
  readonly views: ControlViews;
  readonly fd: number;
  readonly #ino: number;
  readonly #path: string;
  #mapping: Mapping | null;

  private constructor(domid: number, path: string, fd: number, ino: number, g: DomainGeometry, mapping: Mapping) {
    this.domid = domid;
    this.#path = path;
    this.fd = fd;
    this.#ino = ino;
    this.geometry = g;
    this.#mapping = mapping;
    this.views = new ControlViews(mapping.buffer, g);
  }

  static open(dir: string, domid: number): PeerDomain {
    const path = memoryPath(dir, domid);
    let fd: number;
    try {
      fd = fs.openSync(path, 'r+');
    } catch {
      throw new DomainError('ESRCH', `domain ${domid} does not exist`);
    }
    try {
      const st = fs.fstatSync(fd);
      const hdr = Buffer.alloc(32);
      if (fs.readSync(fd, hdr, 0, 32, 0) !== 32) throw new DomainError('ESRCH', `domain ${domid}: truncated header`);
      const ports = hdr.readUInt32LE(HDR_EVTCHN_PORTS * 4);
      const g: DomainGeometry = {
        nrPages: hdr.readUInt32LE(HDR_NR_PAGES * 4),
        grantFrames: hdr.readUInt32LE(HDR_GRANT_FRAMES * 4),
        evtchnPages: Math.floor(ports / EVTCHN_PORTS_PER_PAGE),
      };
      // The file belongs to that domain, so validate everything before trusting sizes from it.
      if (
        hdr.readUInt32LE(HDR_MAGIC * 4) !== DOMAIN_MAGIC ||
        hdr.readUInt32LE(HDR_VERSION * 4) !== LAYOUT_VERSION ||
        hdr.readUInt32LE(HDR_DOMID * 4) !== domid ||
        g.grantFrames < 1 ||
        g.grantFrames > MAX_GRANT_FRAMES ||
        g.nrPages < 1 ||
        g.nrPages > MAX_PAGES ||
        ports % EVTCHN_PORTS_PER_PAGE !== 0 ||
        g.evtchnPages < 1 ||
        g.evtchnPages > MAX_EVTCHN_PAGES ||
        st.size < fileSize(g)
      ) {
        throw new DomainError('ESRCH', `domain ${domid}: memory file is not a valid domain`);
      }
      const mapping = mapShared(fd, 0, controlSize(g), true);
      return new PeerDomain(domid, path, fd, st.ino, g, mapping);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** False once the domain was destroyed and perhaps re-created under the same domid. */
  valid(): boolean {
    try {
      return fs.statSync(this.#path).ino === this.#ino;
    } catch {
      return false;
    }
  }

  /** Byte offset of guest frame `gfn` in the memory file, or -1 when the frame does not exist. */
  frameOffset(gfn: number): number {
    if (!Number.isInteger(gfn) || gfn < 0 || gfn >= this.geometry.nrPages) return -1;
    return framesOffset(this.geometry) + gfn * PAGE_SIZE;
  }

  close(): void {
    if (!this.#mapping) return;
    this.#mapping.unmap();
    this.#mapping = null;
    fs.closeSync(this.fd);
  }
}
