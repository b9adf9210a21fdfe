// XenStore node permissions (docs/protocols/xs-wire.md): a list of `<letter><domid>` entries, letter
// n (none), r (read), w (write), b (both). The first entry names the owner, who always has full
// access, and its letter is what every domain not listed gets. dom0 is privileged and bypasses them.

export type Access = 'n' | 'r' | 'w' | 'b';

/** One permission entry, e.g. {domid: 5, access: 'r'} for `r5`. */
export interface Perm {
  readonly domid: number;
  readonly access: Access;
}

/** Highest domid a permission may name (DOMID_FIRST_RESERVED - 1). */
export const DOMID_MAX = 0x7fef;

/** `r5` → {domid 5, access r}; undefined for anything else (bad letter, non-decimal, out of range). */
export function parsePerm(s: string): Perm | undefined {
  const m = /^([nrwb])(0|[1-9][0-9]{0,4})$/.exec(s);
  if (!m) return undefined;
  const domid = Number(m[2]);
  if (domid > DOMID_MAX) return undefined;
  return { domid, access: m[1] as Access };
}

export function formatPerm(p: Perm): string {
  return `${p.access}${p.domid}`;
}

/** Parse a list of entries (at least one); undefined if any entry is malformed. */
export function parsePerms(list: readonly string[]): Perm[] | undefined {
  if (list.length === 0) return undefined;
  const out: Perm[] = [];
  for (const s of list) {
    const p = parsePerm(s);
    if (!p) return undefined;
    out.push(p);
  }
  return out;
}

/** What `domid` may do with a node carrying `perms` (owner: everything; else its entry or the default). */
export function accessOf(perms: readonly Perm[], domid: number): Access {
  const owner = perms[0]!;
  if (owner.domid === domid) return 'b';
  for (let i = 1; i < perms.length; i++) if (perms[i]!.domid === domid) return perms[i]!.access;
  return owner.access;
}

export function canRead(perms: readonly Perm[], domid: number): boolean {
  const a = accessOf(perms, domid);
  return a === 'r' || a === 'b';
}

export function canWrite(perms: readonly Perm[], domid: number): boolean {
  const a = accessOf(perms, domid);
  return a === 'w' || a === 'b';
}
