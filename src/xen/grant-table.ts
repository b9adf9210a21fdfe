// Grant tables v1 (docs/hypervisor.md, docs/protocols/grant-table.md): the granter's side (grant access
// to a frame, end access) in the granter's own grant table, and the mapper's side, which asks the hypervisor process: it does the checks
// Xen's map_grant_ref does, answers with the same GNTST statuses and hands over the granted frame alone.
// While a grant is mapped its GTF_reading/GTF_writing bits are set, so the granter cannot end access.
import { mapPagesContiguous, mapShared, PAGE_SIZE, type Mapping } from '../../native/libc.js';
import { closeFd } from '../../native/unix-rights.js';
import { GNTTAB_NR_RESERVED_ENTRIES } from './layout.js';
import { DomainError, type Domain } from './domain.js';
import { HC } from './hypercall.js';

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

  /** The hypervisor's handles of the refs' mappings, for unmap. */
  readonly handles: readonly number[];

  constructor(mapper: GrantMapper, granter: number, refs: number[], readonly: boolean, mapping: Mapping, handles: number[]) {
    this.handles = handles;
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

  /** GNTTABOP_unmap_grant_ref; `wait: false` posts it (see HypercallClient.post). */
  unmap(opts: { wait?: boolean } = {}): void {
    if (!this.#mapping) return;
    const m = this.#mapping;
    this.#mapping = null;
    m.unmap();
    this.#mapper.release(this, opts.wait ?? true);
  }
}

/** The mapper's half: map grants other domains made to us, through the hypervisor's checks. */
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

  /**
   * Map several refs of one granter side by side (a multi-page ring), all or nothing. The hypervisor
   * checks each entry, pins it and hands over exactly that frame, read-only when asked (or granted) so.
   */
  mapMany(granter: number, refs: readonly number[], opts: MapOptions = {}): GrantMapping {
    const ro = opts.readonly ?? false;
    const handles: number[] = [];
    const fds: number[] = [];
    try {
      for (const ref of refs) {
        if (!Number.isInteger(ref) || ref < 0 || ref > 0xffffffff) throw new GrantError(GNTST.bad_gntref, `ref ${ref} is not a grant reference`);
        const rep = this.#dom.hc.tryCall(HC.map_grant, [granter, ref, ro ? 1 : 0]);
        if (rep.status !== 0) {
          for (const fd of rep.fds) closeFd(fd);
          throw new GrantError(rep.status, `dom${granter} ref ${ref} for dom${this.#dom.domid}${ro ? ' (read-only)' : ''}`);
        }
        handles.push(rep.r[0]!);
        fds.push(rep.fds[0]!);
      }
      const mapping =
        fds.length === 1 ? mapShared(fds[0]!, 0, PAGE_SIZE, !ro) : mapPagesContiguous(fds.map((fd) => ({ fd, offset: 0, writable: !ro })));
      const gm = new GrantMapping(this, granter, [...refs], ro, mapping, handles);
      this.#live.add(gm);
      return gm;
    } catch (err) {
      for (const h of handles) this.#unmap(h);
      throw err;
    } finally {
      for (const fd of fds) closeFd(fd);
    }
  }

  /** Called by GrantMapping.unmap: the hypervisor drops the pins, clearing the in-use bits with the last. */
  release(gm: GrantMapping, wait = true): void {
    if (!this.#live.delete(gm)) return;
    for (const h of gm.handles) this.#unmap(h, wait);
  }

  unmapAll(): void {
    for (const gm of [...this.#live]) gm.unmap();
  }

  #unmap(handle: number, wait = true): void {
    if (this.#dom.hc.closed) return;
    try {
      if (wait) this.#dom.hc.tryCall(HC.unmap_grant, [handle]);
      else this.#dom.hc.post(HC.unmap_grant, [handle]);
    } catch {
      // The hypervisor is gone, and every pin with it.
    }
  }
}
