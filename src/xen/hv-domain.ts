// What the hypervisor process keeps of one domain, in memory only it maps: the domain's memory (a
// sealed control memfd holding its header and grant table, one sealed memfd per populated frame), the
// active grant entries (pin counts), the grants this domain has mapped from others, and its event-channel
// ports with their routing. Guests see none of this but their own grant table and channel pages.
import fs from 'node:fs';
import { mapShared, memfdSealed, PAGE_SIZE, wakePipe, type Mapping } from '../../native/libc.js';
import { closeFd } from '../../native/unix-rights.js';
import {
  DOMAIN_MAGIC,
  GNTTAB_NR_RESERVED_ENTRIES,
  HDR_DOMID,
  HDR_EVTCHN_PORTS,
  HDR_GRANT_FRAMES,
  HDR_MAGIC,
  HDR_NR_PAGES,
  HDR_VERSION,
  LAYOUT_VERSION,
  controlSize,
  type DomainGeometry,
} from './layout.js';
import { GNTST, GTF_permit_access, GTF_readonly, GTF_reading, GTF_type_mask, GTF_writing } from './grant-table.js';

export const ECS_closed = 0;
export const ECS_unbound = 1;
export const ECS_interdomain = 2;

/** Byte offset of each end's word (pending bit 0, mask bit 1) in a channel page: a cache line apart. */
export const CHANNEL_WORD_STRIDE = 64;

const MAX_PIN = 0xffff;
/**
 * Descriptors the hypervisor keeps for one domain (frames, and five per channel it allocated): a domain
 * past it gets ENOMEM, so no guest can exhaust the hypervisor's descriptors for the others.
 */
export const MAX_OBJECTS_PER_DOMAIN = 2048;

/** Descriptors the hypervisor holds per channel: its page and both ends of its two wake-up pipes. */
export const CHANNEL_OBJECTS = 5;

/** One event channel: a page holding both ends' pending/mask words, and a wake-up pipe towards each end. */
export class Channel {
  readonly page: number;
  /** pipes[e]: [read end, write end] of the pipe whose bytes wake end e. */
  readonly pipes: [[number, number], [number, number]];
  /** The port holding each end, 0 while that end is free. */
  readonly holder: [Port | null, Port | null] = [null, null];

  /** The domain that allocated it, which its descriptors are counted against. */
  readonly owner: HvDomain;

  constructor(owner: HvDomain) {
    this.owner = owner;
    this.page = memfdSealed('evtchn', PAGE_SIZE);
    let first: [number, number] | null = null;
    try {
      first = wakePipe();
      this.pipes = [first, wakePipe()];
    } catch (err) {
      closeFd(this.page);
      for (const fd of first ?? []) closeFd(fd);
      throw err;
    }
    owner.objects += CHANNEL_OBJECTS;
  }

  /** What end `end` gets besides the page: the read end of its own pipe and the write end of its peer's. */
  wakeFds(end: 0 | 1): [number, number] {
    return [this.pipes[end][0], this.pipes[1 - end]![1]];
  }

  /** Set end `end`'s word to pending and unmasked (a port that starts bound starts pending). */
  setPending(end: 0 | 1): void {
    const b = Buffer.alloc(4);
    b.writeInt32LE(1, 0);
    fs.writeSync(this.page, b, 0, 4, CHANNEL_WORD_STRIDE * end);
  }

  destroy(): void {
    this.owner.objects -= CHANNEL_OBJECTS;
    closeFd(this.page);
    for (const p of this.pipes) for (const fd of p) closeFd(fd);
  }
}

export interface Port {
  port: number;
  state: number;
  remoteDom: number;
  remotePort: number;
  chan: Channel;
  end: 0 | 1;
}

let serials = 0;

export class HvDomain {
  readonly domid: number;
  readonly geometry: DomainGeometry;
  readonly maxPorts: number;
  readonly controlFd: number;
  readonly #control: Mapping;
  readonly grant16: Uint16Array;
  readonly grant32: Int32Array;
  readonly nrGrantEntries: number;
  /** Active entries: pins at 2i (readers low 16 bits, writers high 16), pinning domid+1 at 2i+1. */
  readonly active: Int32Array;
  readonly frames = new Map<number, number>();
  readonly ports = new Map<number, Port>();
  /**
   * Grants this domain has mapped, by the handle map_grant returned (Xen's grant_handle_t): an unmap
   * names the mapping, so one of a granter since destroyed and re-created under its domid cannot touch
   * the new one's entries.
   */
  readonly handles = new Map<number, { g: HvDomain; ref: number; ro: boolean }>();
  #nextHandle = 1;
  /** Distinguishes incarnations of one domid. */
  readonly serial: number;
  /** Descriptors held on this domain's behalf (its frames, the channels it allocated). */
  objects = 0;
  /**
   * Its budget of those: MAX_OBJECTS_PER_DOMAIN for guests; dom0, the toolstack's own domain (created
   * only over the root-only toolstack socket), as many as its geometry can use: in multi-VM mode it
   * grants every vTPM domain's ring (33 frames each), far past a guest's budget.
   */
  readonly maxObjects: number;

  constructor(domid: number, g: DomainGeometry, maxPorts: number) {
    this.serial = ++serials;
    this.domid = domid;
    this.geometry = g;
    this.maxPorts = maxPorts;
    this.maxObjects = domid === 0 ? Math.max(MAX_OBJECTS_PER_DOMAIN, g.nrPages + CHANNEL_OBJECTS * maxPorts) : MAX_OBJECTS_PER_DOMAIN;
    this.controlFd = memfdSealed(`dom${domid}-control`, controlSize(g));
    this.#control = mapShared(this.controlFd, 0, controlSize(g), true);
    const header = new Uint32Array(this.#control.buffer, 0, 16);
    header[HDR_VERSION] = LAYOUT_VERSION;
    header[HDR_DOMID] = domid;
    header[HDR_NR_PAGES] = g.nrPages;
    header[HDR_GRANT_FRAMES] = g.grantFrames;
    header[HDR_EVTCHN_PORTS] = maxPorts;
    header[HDR_MAGIC] = DOMAIN_MAGIC;
    const grantBytes = g.grantFrames * PAGE_SIZE;
    this.grant16 = new Uint16Array(this.#control.buffer, PAGE_SIZE, grantBytes / 2);
    this.grant32 = new Int32Array(this.#control.buffer, PAGE_SIZE, grantBytes / 4);
    this.nrGrantEntries = grantBytes / 8;
    this.active = new Int32Array(2 * this.nrGrantEntries);
  }

  /** The frame's memfd, created (sealed, zeroed) on first use; null when gfn is not a frame of ours. */
  frame(gfn: number, populate: boolean): number | null {
    if (!Number.isInteger(gfn) || gfn < 0 || gfn >= this.geometry.nrPages) return null;
    let fd = this.frames.get(gfn);
    if (fd === undefined) {
      if (!populate || this.objects + 1 > this.maxObjects) return null;
      fd = memfdSealed(`dom${this.domid}-gfn${gfn}`, PAGE_SIZE);
      this.frames.set(gfn, fd);
      this.objects++;
    }
    return fd;
  }

  /**
   * Give frame `gfn` back: its memfd is closed here, so a mapper that kept a mapping of it past its
   * grant holds a page nobody uses any more, and the next populate of `gfn` is a fresh page.
   */
  release(gfn: number): void {
    const fd = this.frames.get(gfn);
    if (fd === undefined) return;
    this.frames.delete(gfn);
    this.objects--;
    closeFd(fd);
  }

  /**
   * Xen's map_grant_ref checks on our entry `ref` for mapper `me`, then the pin. Returns the frame's
   * memfd or a negative GNTST status.
   */
  pin(ref: number, me: number, ro: boolean): number {
    if (!Number.isInteger(ref) || ref < GNTTAB_NR_RESERVED_ENTRIES || ref >= this.nrGrantEntries) return GNTST.bad_gntref;
    const pinnedBy = this.active[2 * ref + 1]!;
    if (pinnedBy !== 0 && pinnedBy !== me + 1) return GNTST.general_error;
    for (let attempt = 0; attempt < 4; attempt++) {
      const word = Atomics.load(this.grant32, 2 * ref);
      const flags = word & 0xffff;
      const domid = word >>> 16;
      if ((flags & GTF_type_mask) !== GTF_permit_access || domid !== me) return GNTST.general_error;
      if (!ro && flags & GTF_readonly) return GNTST.general_error;
      const pins = this.active[2 * ref]!;
      if ((pins & MAX_PIN) === MAX_PIN || pins >>> 16 === MAX_PIN) return GNTST.general_error;
      // The frame is read after the flags are claimed, as Xen's, so a granter re-granting is noticed.
      const want = flags | GTF_reading | (ro ? 0 : GTF_writing);
      if (Atomics.compareExchange(this.grant32, 2 * ref, word, (want | (domid << 16)) | 0) !== word) continue;
      this.active[2 * ref] = pins + (ro ? 1 : 0x10000);
      this.active[2 * ref + 1] = me + 1;
      const fd = this.frame(Atomics.load(this.grant32, 2 * ref + 1), false);
      if (fd === null) {
        this.unpin(ref, ro);
        return GNTST.bad_page;
      }
      return fd;
    }
    return GNTST.general_error;
  }

  unpin(ref: number, ro: boolean): void {
    const pins = this.active[2 * ref]! - (ro ? 1 : 0x10000);
    this.active[2 * ref] = pins;
    const readers = pins & MAX_PIN;
    const writers = pins >>> 16;
    if (readers === 0 && writers === 0) this.active[2 * ref + 1] = 0;
    const clear = (writers === 0 ? GTF_writing : 0) | (readers === 0 && writers === 0 ? GTF_reading : 0);
    if (!clear) return;
    for (;;) {
      const flags = Atomics.load(this.grant16, 4 * ref);
      if (Atomics.compareExchange(this.grant16, 4 * ref, flags, flags & ~clear) === flags) return;
    }
  }

  /** Record a mapping; returns its handle. */
  addHandle(g: HvDomain, ref: number, ro: boolean): number {
    while (this.handles.has(this.#nextHandle) || this.#nextHandle === 0) this.#nextHandle = (this.#nextHandle + 1) >>> 0;
    const h = this.#nextHandle;
    this.#nextHandle = (h + 1) >>> 0;
    this.handles.set(h, { g, ref, ro });
    return h;
  }

  /** The lowest free port, or 0 when all are in use. */
  freePort(): number {
    for (let p = 1; p < this.maxPorts; p++) if (!this.ports.has(p)) return p;
    return 0;
  }

  destroy(): void {
    for (const fd of this.frames.values()) closeFd(fd);
    this.frames.clear();
    this.#control.unmap();
    closeFd(this.controlFd);
  }
}
