// Layout of a domain's memory file: what Xen keeps in the hypervisor (grant table, active grant
// entries, event channel table) and the guest frames it can grant, in one file under the host's
// hypervisor directory so every process that maps it sees the same bytes.
//
//   page 0                      header (magic, domid, sizes, owner pid)
//   pages 1 .. G                grant table frames, grant_entry_v1 (flags u16, domid u16, frame u32)
//   pages G+1 .. 2G             active grant entries (the hypervisor's pin counts, 8 bytes each)
//   pages 2G+1 .. 2G+E          event channel table (16 bytes a port, 256 ports a page)
//   pages 2G+E+1 ..             guest frames, gfn 0 .. nr_pages-1
import { join } from 'node:path';
import { PAGE_SIZE } from '../../native/libc.js';

export { PAGE_SIZE };

export const DOMAIN_MAGIC = 0x4d445856; // "VXDM" little-endian
export const LAYOUT_VERSION = 1;

// Header fields, as u32 indices into the header page.
export const HDR_MAGIC = 0;
export const HDR_VERSION = 1;
export const HDR_DOMID = 2;
export const HDR_NR_PAGES = 3;
export const HDR_GRANT_FRAMES = 4;
export const HDR_EVTCHN_PORTS = 5;
export const HDR_PID = 6;

export const GRANT_ENTRY_SIZE = 8;
export const GRANT_ENTRIES_PER_FRAME = PAGE_SIZE / GRANT_ENTRY_SIZE; // 512, as Xen
/** Refs 0..7 are reserved (console, xenstore) as GNTTAB_NR_RESERVED_ENTRIES. */
export const GNTTAB_NR_RESERVED_ENTRIES = 8;

export const EVTCHN_ENTRY_SIZE = 16;
export const EVTCHN_PORTS_PER_PAGE = PAGE_SIZE / EVTCHN_ENTRY_SIZE; // 256
/** Xen's 2-level ABI on 64-bit guests: 64 × 64 pending bits, 4096 ports, 16 pages of ours. */
export const MAX_EVTCHN_PAGES = 16;

export interface DomainGeometry {
  nrPages: number;
  grantFrames: number;
  /** Event-channel table pages, 256 ports each (a backend serving many guests needs more). */
  evtchnPages: number;
}

export const DEFAULT_GEOMETRY: DomainGeometry = { nrPages: 256, grantFrames: 1, evtchnPages: 1 };

export function grantTableOffset(_g: DomainGeometry): number {
  return PAGE_SIZE;
}
export function activeTableOffset(g: DomainGeometry): number {
  return PAGE_SIZE * (1 + g.grantFrames);
}
export function evtchnOffset(g: DomainGeometry): number {
  return PAGE_SIZE * (1 + 2 * g.grantFrames);
}
export function framesOffset(g: DomainGeometry): number {
  return PAGE_SIZE * (1 + 2 * g.grantFrames + g.evtchnPages);
}
export function fileSize(g: DomainGeometry): number {
  return framesOffset(g) + g.nrPages * PAGE_SIZE;
}
/** Everything but the guest frames: what a peer maps to act as the hypervisor on this domain. */
export function controlSize(g: DomainGeometry): number {
  return framesOffset(g);
}

/**
 * The directory that plays the hypervisor for one host: domain memory files and event-channel
 * sockets. Taken from VTPM_XEN_DIR so every process of a host (and its tests) agree on it.
 */
export function xenDir(explicit?: string): string {
  return explicit ?? process.env.VTPM_XEN_DIR ?? '/dev/shm/vtpm-split';
}

export function memoryPath(dir: string, domid: number): string {
  return join(dir, `dom${domid}.mem`);
}

export function evtchnSocketPath(dir: string, domid: number): string {
  return join(dir, `dom${domid}.evt`);
}
