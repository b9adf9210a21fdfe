// Grant tables v1 (docs/protocols/grant-table.md): the granter's side (grant access to a frame, end access) and the
// mapper's side, which does the checks Xen's map_grant_ref does and answers with the same GNTST
// statuses. While a grant is mapped its GTF_reading/GTF_writing bits are set, so the granter cannot
// end access, exactly as with Xen.
import { mapPagesContiguous, mapShared, PAGE_SIZE, type Mapping } from '../../native/libc.js';
import { GNTTAB_NR_RESERVED_ENTRIES } from './layout.js';
import { DomainError, type Domain, type PeerDomain } from './domain.js';

export const GTF_invalid = 0;
export const GTF_permit_access = 1;
export const GTF_accept_transfer = 2;
export const GTF_type_mask = 3;
export const GTF_readonly = 1 << 2;
export const GTF_reading = 1 << 3;
export const GTF_writing = 1 << 4;

/** Per-operation statuses of GNTTABOP_map_grant_ref (docs/protocols/grant-table.md, Mapping). */
export const GNTST = {
  okay: 0,
  general_error: -1,
  bad_domain: -2,
  bad_gntref: -3,
  bad_handle: -4,
  permission_denied: -8,
  bad_page: -9,
  eagain: -12,
  no_space: -13,
} as const;

const GNTST_NAMES = new Map<number, string>(Object.entries(GNTST).map(([k, v]) => [v, `GNTST_${k}`]));

export class GrantError extends Error {
  constructor(
    readonly status: number,
    detail: string,
  ) {
    super(`${GNTST_NAMES.get(status) ?? `GNTST ${status}`} (${status}): ${detail}`);
    this.name = 'GrantError';
  }
}

/** The granter's half: this domain grants its own frames to others. */
export class GrantTable {
  readonly #dom: Domain;
  #next = GNTTAB_NR_RESERVED_ENTRIES;

  constructor(dom: Domain) {
    this.#dom = dom;
  }

  /** gnttab_grant_foreign_access: let `domid` map frame `gfn` of ours; returns the grant ref. */
  grantAccess(domid: number, gfn: number, readonly = false): number {
    const v = this.#dom.views;
    if (gfn < 0 || gfn >= this.#dom.geometry.nrPages) throw new RangeError(`gfn ${gfn} is not ours`);
    const n = v.nrGrantEntries;
    for (let i = 0; i < n - GNTTAB_NR_RESERVED_ENTRIES; i++) {
      const ref = GNTTAB_NR_RESERVED_ENTRIES + ((this.#next - GNTTAB_NR_RESERVED_ENTRIES + i) % (n - GNTTAB_NR_RESERVED_ENTRIES));
      // A free entry has no type and no pins left over from an earlier grant of it.
      if (Atomics.load(v.grant16, 4 * ref) !== 0) continue;
      Atomics.store(v.grant16, 4 * ref + 1, domid);
      Atomics.store(v.grant32, 2 * ref + 1, gfn);
      // Flags last (Xen: domid, frame, wmb, flags): a mapper that sees the type sees the rest.
      Atomics.store(v.grant16, 4 * ref, GTF_permit_access | (readonly ? GTF_readonly : 0));
      this.#next = ref + 1;
      return ref;
    }
    throw new DomainError('ENOMEM', `domain ${this.#dom.domid}: grant table full`);
  }

  /**
   * gnttab_end_foreign_access_ref: revoke an unused grant. Returns false, changing nothing, while the
   * grantee still has it mapped (GTF_reading/GTF_writing set), as Xen does not revoke in-use grants.
   */
  endAccess(ref: number): boolean {
    const v = this.#dom.views;
    if (ref < GNTTAB_NR_RESERVED_ENTRIES || ref >= v.nrGrantEntries) throw new RangeError(`grant ref ${ref} out of range`);
    for (;;) {
      const flags = Atomics.load(v.grant16, 4 * ref);
      if ((flags & GTF_type_mask) === GTF_invalid) throw new Error(`grant ref ${ref} is not granted`);
      if (flags & (GTF_reading | GTF_writing)) return false;
      if (Atomics.compareExchange(v.grant16, 4 * ref, flags, 0) === flags) return true;
    }
  }

  /**
   * The grantee `domid` was destroyed (its process is dead): drop the pins it left on our grants, as Xen
   * releases a dying domain's mappings (gnttab_release_mappings), so endAccess can revoke them again.
   * Only for a domain whose process is known to be gone. Returns how many entries were released.
   */
  releasePinsOf(domid: number): number {
    const v = this.#dom.views;
    let n = 0;
    for (let ref = GNTTAB_NR_RESERVED_ENTRIES; ref < v.nrGrantEntries; ref++) {
      if (Atomics.load(v.active, 2 * ref + 1) !== domid + 1) continue;
      Atomics.store(v.active, 2 * ref, 0);
      Atomics.store(v.active, 2 * ref + 1, 0);
      for (;;) {
        const flags = Atomics.load(v.grant16, 4 * ref);
        if (Atomics.compareExchange(v.grant16, 4 * ref, flags, flags & ~(GTF_reading | GTF_writing)) === flags) break;
      }
      n++;
    }
    return n;
  }

  /** Flags of a ref as the granter sees them (for tests and diagnostics). */
  flags(ref: number): number {
    return Atomics.load(this.#dom.views.grant16, 4 * ref);
  }
}

export interface MapOptions {
  readonly?: boolean;
}

/** A mapped grant (or several, contiguous): a view of exactly the granted page(s). */
export class GrantMapping {
  readonly granter: number;
  readonly refs: readonly number[];
  readonly readonly: boolean;
  #mapping: Mapping | null;
  readonly #mapper: GrantMapper;

  constructor(mapper: GrantMapper, granter: number, refs: number[], readonly: boolean, mapping: Mapping) {
    this.#mapper = mapper;
    this.granter = granter;
    this.refs = refs;
    this.readonly = readonly;
    this.#mapping = mapping;
  }

  get buffer(): ArrayBuffer {
    if (!this.#mapping) throw new Error(`grant mapping of dom${this.granter} refs ${this.refs.join(',')} used after unmap`);
    return this.#mapping.buffer;
  }

  get mapped(): boolean {
    return this.#mapping !== null;
  }

  unmap(): void {
    if (!this.#mapping) return;
    const m = this.#mapping;
    this.#mapping = null;
    m.unmap();
    this.#mapper.release(this);
  }
}

const MAX_PIN = 0xffff;
const UNSTABLE_RETRIES = 4;

/** The mapper's half: map grants other domains made to us, with Xen's checks. */
export class GrantMapper {
  readonly #dom: Domain;
  readonly #live = new Set<GrantMapping>();

  constructor(dom: Domain) {
    this.#dom = dom;
  }

  /** GNTTABOP_map_grant_ref for one ref. Throws GrantError carrying Xen's status. */
  map(granter: number, ref: number, opts: MapOptions = {}): GrantMapping {
    return this.mapMany(granter, [ref], opts);
  }

  /** Map several refs of one granter side by side (a multi-page ring), all or nothing. */
  mapMany(granter: number, refs: readonly number[], opts: MapOptions = {}): GrantMapping {
    const ro = opts.readonly ?? false;
    let peer: PeerDomain;
    try {
      peer = this.#dom.peer(granter, true);
    } catch (err) {
      if (err instanceof DomainError) throw new GrantError(GNTST.bad_domain, `dom${granter} does not exist`);
      throw err;
    }
    const pinned: number[] = [];
    const offsets: number[] = [];
    try {
      for (const ref of refs) {
        offsets.push(this.#pin(peer, ref, ro));
        pinned.push(ref);
      }
      const mapping =
        offsets.length === 1
          ? mapShared(peer.fd, offsets[0]!, PAGE_SIZE, !ro)
          : mapPagesContiguous(offsets.map((offset) => ({ fd: peer.fd, offset, writable: !ro })));
      const gm = new GrantMapping(this, granter, [...refs], ro, mapping);
      this.#live.add(gm);
      return gm;
    } catch (err) {
      for (const ref of pinned) this.#unpin(peer, ref, ro);
      throw err;
    }
  }

  /** Called by GrantMapping.unmap: drop the pins and clear the in-use bits when the last one goes. */
  release(gm: GrantMapping): void {
    if (!this.#live.delete(gm)) return;
    let peer: PeerDomain;
    try {
      peer = this.#dom.peer(gm.granter);
    } catch {
      return; // The granter is gone; nothing left to unpin.
    }
    for (const ref of gm.refs) this.#unpin(peer, ref, gm.readonly);
  }

  unmapAll(): void {
    for (const gm of [...this.#live]) gm.unmap();
  }

  /** Xen's checks for one entry, then the pin; returns the frame's offset in the granter's file. */
  #pin(peer: PeerDomain, ref: number, ro: boolean): number {
    const v = peer.views;
    const me = this.#dom.domid;
    if (!Number.isInteger(ref) || ref < 0 || ref >= v.nrGrantEntries) {
      throw new GrantError(GNTST.bad_gntref, `ref ${ref} is past dom${peer.domid}'s table of ${v.nrGrantEntries}`);
    }
    const pinnedBy = Atomics.load(v.active, 2 * ref + 1);
    if (pinnedBy !== 0 && pinnedBy !== me + 1) {
      throw new GrantError(GNTST.general_error, `dom${peer.domid} ref ${ref} is pinned by dom${pinnedBy - 1}`);
    }
    for (let attempt = 0; ; attempt++) {
      if (attempt > UNSTABLE_RETRIES) {
        throw new GrantError(GNTST.general_error, `dom${peer.domid} ref ${ref}: entry unstable`);
      }
      const word = Atomics.load(v.grant32, 2 * ref);
      const flags = word & 0xffff;
      const domid = word >>> 16;
      if ((flags & GTF_type_mask) !== GTF_permit_access || domid !== me) {
        throw new GrantError(GNTST.general_error, `dom${peer.domid} ref ${ref} is not granted to dom${me}`);
      }
      if (!ro && flags & GTF_readonly) {
        throw new GrantError(GNTST.general_error, `dom${peer.domid} ref ${ref} is read-only; writable map refused`);
      }
      const pins = Atomics.load(v.active, 2 * ref);
      if ((pins & MAX_PIN) === MAX_PIN || pins >>> 16 === MAX_PIN) {
        throw new GrantError(GNTST.general_error, `dom${peer.domid} ref ${ref}: pin overflow`);
      }
      const want = flags | GTF_reading | (ro ? 0 : GTF_writing);
      // One CAS over flags and domid, as Xen's, so a granter re-granting under us is noticed.
      if (Atomics.compareExchange(v.grant32, 2 * ref, word, (want | (domid << 16)) | 0) !== word) continue;
      Atomics.add(v.active, 2 * ref, ro ? 1 : 0x10000);
      Atomics.store(v.active, 2 * ref + 1, me + 1);
      const offset = peer.frameOffset(Atomics.load(v.grant32, 2 * ref + 1));
      if (offset < 0) {
        this.#unpin(peer, ref, ro);
        throw new GrantError(GNTST.bad_page, `dom${peer.domid} ref ${ref} names a frame it does not have`);
      }
      return offset;
    }
  }

  #unpin(peer: PeerDomain, ref: number, ro: boolean): void {
    const v = peer.views;
    const pins = Atomics.sub(v.active, 2 * ref, ro ? 1 : 0x10000) - (ro ? 1 : 0x10000);
    const readers = pins & MAX_PIN;
    const writers = pins >>> 16;
    if (readers === 0 && writers === 0) Atomics.store(v.active, 2 * ref + 1, 0);
    const clear = (writers === 0 ? GTF_writing : 0) | (readers === 0 && writers === 0 ? GTF_reading : 0);
    if (!clear) return;
    for (;;) {
      const flags = Atomics.load(v.grant16, 4 * ref);
      if (Atomics.compareExchange(v.grant16, 4 * ref, flags, flags & ~clear) === flags) return;
    }
  }
}
