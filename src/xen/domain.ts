// A domain: a process with a domid, holding what a Xen guest holds and nothing more (docs/hypervisor.md):
// its connection to the hypervisor process (which is its identity), its own memory (a control page
// with its grant table, and its guest frames, each handed over as a sealed memfd), and the pages and
// sockets of the event channels it is an end of. Other domains' memory is reached only through grants
// the hypervisor maps; there is no path under the hypervisor directory a domain opens.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { mapShared, Region, type Mapping } from '../../native/libc.js';
import { closeFd } from '../../native/unix-rights.js';
import {
  DEFAULT_GEOMETRY,
  EVTCHN_PORTS_PER_PAGE,
  MAX_EVTCHN_PAGES,
  PAGE_SIZE,
  controlSize,
  xenDir,
  type DomainGeometry,
} from './layout.js';
import { GrantTable, GrantMapper } from './grant-table.js';
import { EventChannels } from './event-channel.js';
import { EEXIST, ESRCH, HC, HypercallClient, HypercallError, POPULATE_MAX, hypervisorSocket } from './hypercall.js';

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

/** This domain's control page as typed views: header and grant table (the hypervisor reads it too). */
export class ControlViews {
  readonly header: Uint32Array;
  /** grant_entry_v1 as u16 (flags at 4i, domid at 4i+1) … */
  readonly grant16: Uint16Array;
  /** … as i32 (flags|domid<<16 at 2i, frame at 2i+1) so flags and domid can be swapped in one CAS. */
  readonly grant32: Int32Array;
  readonly nrGrantEntries: number;
  /** Ports 1 .. nrPorts-1 exist (port 0 is never used, as in Xen). */
  readonly nrPorts: number;

  constructor(buf: ArrayBuffer, g: DomainGeometry) {
    const grantBytes = g.grantFrames * PAGE_SIZE;
    this.header = new Uint32Array(buf, 0, PAGE_SIZE / 4);
    this.grant16 = new Uint16Array(buf, PAGE_SIZE, grantBytes / 2);
    this.grant32 = new Int32Array(buf, PAGE_SIZE, grantBytes / 4);
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

const here = dirname(fileURLToPath(import.meta.url));
const HYPERVISOR_MAIN = import.meta.url.endsWith('.ts') ? join(here, '../../dist/src/xen/hypervisor-main.js') : join(here, 'hypervisor-main.js');

/**
 * The toolstack's connection to the hypervisor of `dir`. When none runs there (a test, a lone tool), one
 * is started on demand; it exits by itself once idle (src/xen/hypervisor-main.ts).
 */
export async function hypervisorControl(dir: string): Promise<HypercallClient> {
  const path = hypervisorSocket(dir);
  let started = false;
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      return HypercallClient.control(path);
    } catch (err) {
      const e = (err as { errno?: number }).errno;
      if (e !== 2 && e !== 111) throw err; // ENOENT, ECONNREFUSED: nobody listens yet
    }
    if (!started) {
      started = true;
      // Loaded only here: domain processes never start a hypervisor and need not carry child_process.
      const { spawn } = await import('node:child_process');
      const child = spawn(process.execPath, [HYPERVISOR_MAIN, dir], { detached: true, stdio: 'ignore' });
      child.unref();
    }
    if (Date.now() > deadline) throw new DomainError('ESRCH', `no hypervisor answers on ${path}`);
    await sleep(10);
  }
}

/**
 * dom0's toolstack: create domain `domid` and return the descriptor of its hypercall connection, to be
 * handed to the domain's process (VTPM_HV_FD) or used here by Domain.attach.
 */
export async function createDomainConnection(opts: DomainOptions): Promise<number> {
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
  const ctl = await hypervisorControl(xenDir(opts.dir));
  try {
    let rep = ctl.tryCall(HC.domctl_create, [domid, g.nrPages, g.grantFrames, g.evtchnPages * EVTCHN_PORTS_PER_PAGE]);
    // A predecessor that just died is destroyed once the hypervisor sees its connection close.
    for (let i = 0; i < 50 && rep.status === -EEXIST; i++) {
      await sleep(20);
      rep = ctl.tryCall(HC.domctl_create, [domid, g.nrPages, g.grantFrames, g.evtchnPages * EVTCHN_PORTS_PER_PAGE]);
    }
    if (rep.status === -EEXIST) throw new DomainError('EEXIST', `domain ${domid} already exists`);
    if (rep.status !== 0 || rep.fds.length !== 1) {
      for (const fd of rep.fds) closeFd(fd);
      throw new DomainError('EINVAL', `domain ${domid}: create failed (status ${rep.status})`);
    }
    return rep.fds[0]!;
  } finally {
    ctl.close();
  }
}

/** Whether domain `domid` exists on the hypervisor of `dir`. */
export async function domainExists(dir: string, domid: number): Promise<boolean> {
  const ctl = await hypervisorControl(dir);
  try {
    return ctl.tryCall(HC.domctl_getinfo, [domid]).status === 0;
  } finally {
    ctl.close();
  }
}

/** This process's own domain. */
export class Domain {
  readonly domid: number;
  readonly dir: string;
  readonly geometry: DomainGeometry;
  readonly views: ControlViews;
  readonly grants: GrantTable;
  readonly mapper: GrantMapper;
  readonly evtchn: EventChannels;
  /** The hypercall connection: closing it destroys the domain. */
  readonly hc: HypercallClient;
  readonly #control: Mapping;
  readonly #region: Region;
  readonly #frames: Uint8Array;
  readonly #populated: Uint8Array;
  readonly #used: Uint8Array;
  #closed = false;

  private constructor(hc: HypercallClient, dir: string) {
    this.hc = hc;
    this.dir = dir;
    const info = hc.call(HC.domain_info);
    this.domid = info.r[0]!;
    this.geometry = { nrPages: info.r[1]!, grantFrames: info.r[2]!, evtchnPages: Math.ceil(info.r[3]! / EVTCHN_PORTS_PER_PAGE) };
    try {
      this.#control = mapShared(info.fds[0]!, 0, controlSize(this.geometry), true);
    } finally {
      closeFd(info.fds[0]!);
    }
    this.views = new ControlViews(this.#control.buffer, this.geometry);
    this.#region = new Region(this.geometry.nrPages * PAGE_SIZE);
    this.#frames = new Uint8Array(this.#region.buffer);
    this.#populated = new Uint8Array(this.geometry.nrPages);
    this.#used = new Uint8Array(this.geometry.nrPages);
    this.grants = new GrantTable(this);
    this.mapper = new GrantMapper(this);
    this.evtchn = new EventChannels(this);
  }

  /**
   * Become domain `opts.domid`: created through dom0's toolstack socket, or, in a process started with
   * its connection (VTPM_HV_FD), by that connection alone.
   */
  static async create(opts: DomainOptions): Promise<Domain> {
    const inherited = process.env.VTPM_HV_FD;
    if (inherited !== undefined && inherited !== '') {
      delete process.env.VTPM_HV_FD;
      const d = Domain.attach(Number(inherited), opts.dir);
      if (d.domid !== opts.domid) {
        await d.close();
        throw new DomainError('EINVAL', `VTPM_HV_FD is domain ${d.domid}, not ${opts.domid}`);
      }
      return d;
    }
    return Domain.attach(await createDomainConnection(opts), opts.dir);
  }

  /** The domain whose hypercall connection is `fd` (this process now owns the descriptor). */
  static attach(fd: number, dir?: string): Domain {
    return new Domain(new HypercallClient(fd), xenDir(dir));
  }

  /**
   * Allocate `count` contiguous guest frames (zeroed); returns the first gfn. Frames already backed are
   * taken first (no populate hypercall), as a guest's page allocator hands out memory it has.
   */
  allocFrames(count = 1): number {
    const first = this.#freeRun(count, true) ?? this.#freeRun(count, false);
    if (first === undefined) throw new DomainError('ENOMEM', `domain ${this.domid}: no ${count} free contiguous frames`);
    this.#populate(first, count);
    this.#used.fill(1, first, first + count);
    this.#frames.fill(0, first * PAGE_SIZE, (first + count) * PAGE_SIZE);
    return first;
  }

  /** The first run of `count` free frames (all of them backed, with `backed`). */
  #freeRun(count: number, backed: boolean): number | undefined {
    let run = 0;
    for (let gfn = 0; gfn < this.#used.length; gfn++) {
      run = this.#used[gfn] || (backed && !this.#populated[gfn]) ? 0 : run + 1;
      if (run === count) return gfn - count + 1;
    }
    return undefined;
  }

  /**
   * Make sure `count` contiguous free frames are backed, populating them now if none are: called while
   * idle (after a ring is set up), so the next allocFrames of that size (a resume's ring) makes no
   * hypercall. Returns whether it had to populate.
   */
  keepSpare(count: number): boolean {
    if (this.#closed || this.hc.closed || this.#freeRun(count, true) !== undefined) return false;
    const first = this.#freeRun(count, false);
    if (first === undefined) return false;
    this.#populate(first, count);
    return true;
  }

  /** XENMEM_populate_physmap for the frames not backed yet, placed side by side in our range. */
  #populate(first: number, count: number): void {
    for (let gfn = first; gfn < first + count; ) {
      if (this.#populated[gfn]) {
        gfn++;
        continue;
      }
      let n = 1;
      while (n < POPULATE_MAX && gfn + n < first + count && !this.#populated[gfn + n]) n++;
      const rep = this.hc.call(HC.populate, [gfn, n]);
      try {
        rep.fds.forEach((fd, i) => this.#region.place((gfn + i) * PAGE_SIZE, fd, true));
      } finally {
        for (const fd of rep.fds) closeFd(fd);
      }
      this.#populated.fill(1, gfn, gfn + n);
      gfn += n;
    }
  }

  /**
   * Free frames and give them back to the hypervisor (XENMEM_decrease_reservation): a backend that kept
   * a mapping of one past its grant never sees what this domain puts there next.
   */
  freeFrames(gfn: number, count = 1): void {
    this.#used.fill(0, gfn, gfn + count);
    if (this.#closed || this.hc.closed) return;
    this.hc.call(HC.decrease_reservation, [gfn, count]);
    this.#populated.fill(0, gfn, gfn + count);
  }

  /**
   * Free frames but keep them backed, as a guest's page allocator takes a page back: the next
   * allocFrames reuses them (zeroed) without a hypercall. Only for frames no other domain has mapped
   * (every grant of them ended); otherwise freeFrames gives them back to the hypervisor.
   */
  releaseFrames(gfn: number, count = 1): void {
    this.#used.fill(0, gfn, gfn + count);
  }

  /** A view of guest frames gfn .. gfn+count-1 (this domain's own memory). */
  frames(gfn: number, count = 1): Uint8Array {
    if (gfn < 0 || gfn + count > this.geometry.nrPages) throw new RangeError(`gfn ${gfn}+${count} out of range`);
    for (let i = gfn; i < gfn + count; i++) if (!this.#populated[i]) throw new RangeError(`gfn ${i} is not populated`);
    return this.#frames.subarray(gfn * PAGE_SIZE, (gfn + count) * PAGE_SIZE);
  }

  /** Whether guest frame `gfn` is backed by memory (allocated at least once). */
  populated(gfn: number): boolean {
    return this.#populated[gfn] === 1;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Leave: event channels and grant mappings are dropped and the hypercall connection closed, which
   * destroys the domain (the hypervisor releases what it held for us). Pages others still map stay
   * valid for them: memory is sealed, never shrunk under a mapping.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.evtchn.shutdown();
    this.mapper.unmapAll();
    this.#region.unmap();
    this.#control.unmap();
    this.hc.close();
  }

  /** Close and remove the domain from the host, as the toolstack destroying it. */
  async destroy(): Promise<void> {
    await this.close();
  }
}

export { HypercallError, ESRCH };
