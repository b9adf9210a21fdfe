// Layout of a domain's control memory, the memfd the hypervisor process creates for it (docs/hypervisor.md):
// the page of it both see, and the grant table the domain writes and the hypervisor checks. Guest frames
// are separate memfds, one per frame; pin counts and event-channel routing stay in the hypervisor.
//
//   page 0          header (magic, version, domid, sizes), written by the hypervisor
//   pages 1 .. G    grant table frames, grant_entry_v1 (flags u16, domid u16, frame u32)
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

export const GRANT_ENTRY_SIZE = 8;
export const GRANT_ENTRIES_PER_FRAME = PAGE_SIZE / GRANT_ENTRY_SIZE; // 512, as Xen
/** Refs 0..7 are reserved (console, xenstore) as GNTTAB_NR_RESERVED_ENTRIES. */
export const GNTTAB_NR_RESERVED_ENTRIES = 8;

/** Ports are sized in steps of 256 (`evtchnPages`). */
export const EVTCHN_PORTS_PER_PAGE = 256;
/** Xen's 2-level ABI on 64-bit guests: 64 × 64 pending bits, 4096 ports, 16 steps of ours. */
export const MAX_EVTCHN_PAGES = 16;

export interface DomainGeometry {
  nrPages: number;
  grantFrames: number;
  /** Event-channel ports in steps of 256 (a backend serving many guests needs more). */
  evtchnPages: number;
}

export const DEFAULT_GEOMETRY: DomainGeometry = { nrPages: 256, grantFrames: 1, evtchnPages: 1 };

/** Header page and grant table: what the domain and the hypervisor both map. */
export function controlSize(g: DomainGeometry): number {
  return PAGE_SIZE * (1 + g.grantFrames);
}

/**
 * The hypervisor directory of one host: its toolstack socket and pid file, nothing a domain opens.
 * Taken from VTPM_XEN_DIR so every process of a host (and its tests) agree on it.
 */
export function xenDir(explicit?: string): string {
  return explicit ?? process.env.VTPM_XEN_DIR ?? '/dev/shm/vtpm-split';
}
