// The process boundary of a host (docs/isolation.md): every guest and every vTPM domain runs under its
// own uid and gid (base + domid), with no_new_privs, no capabilities, one supplementary group named here
// and a seccomp filter; the state dir, host.json, the logs, the dom0 xenstore socket, the hypervisor dir
// and the manager's FIFOs stay root-only. Only root can hand out uids, so a host started by anyone else
// runs with `isolation: none` and says so. The uid switch happens in util-linux setpriv before exec, so a
// domain process never runs a line of its own code with dom0's identity.
import fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { HostInfo } from './rundir.js';

export type IsolationMode = 'uid' | 'none';

export interface Isolation {
  mode: IsolationMode;
  /** dom<N> runs as uid/gid uidBase + N (N >= 1); two ids above the domids are groups. */
  uidBase: number;
  /** Why the mode is `none` (empty under `uid`). */
  reason: string;
}

/** Above the usual /etc/subuid ranges (100000 + 65536·k for the first users) and below 2^31. */
export const DEFAULT_UID_BASE = 0x40000000;
const MAX_DOMID = 0x7fef;
/** Group of vTPM domains: the vTPM-domain register dir. */
const VTPM_DOMAIN_GROUP = 0x7ff0;
/** Group of guests: the directory of guest records they rewrite when they suspend. */
const GUEST_GROUP = 0x7ff1;
/** The uids one host hands out: its domids and its two groups (src/cli/uid-claims.ts keeps hosts apart). */
export const UID_RANGE = 0x8000;

export class IsolationError extends Error {
  constructor(
    readonly code: 'NOT_ROOT' | 'NO_SETPRIV' | 'UNREACHABLE' | 'BAD_BASE' | 'BAD_DOMID' | 'UID_RANGE_TAKEN',
    message: string,
  ) {
    super(message);
    this.name = 'IsolationError';
  }
}

export function parseUidBase(v: string | undefined): number {
  if (v === undefined || v === '') return DEFAULT_UID_BASE;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1000 || n + UID_RANGE - 1 > 0x7fffffff) throw new IsolationError('BAD_BASE', `uid base ${v}: want an integer in 1000..${0x7fffffff - UID_RANGE + 1}`);
  return n;
}

export function domainUid(iso: Isolation, domid: number): number {
  if (!Number.isInteger(domid) || domid < 1 || domid > MAX_DOMID) throw new IsolationError('BAD_DOMID', `no per-domain uid for domid ${domid}`);
  return iso.uidBase + domid;
}
export const vtpmDomainGid = (iso: Isolation): number => iso.uidBase + VTPM_DOMAIN_GROUP;
export const guestGid = (iso: Isolation): number => iso.uidBase + GUEST_GROUP;

let setprivPath: string | null | undefined;
function findSetpriv(): string | null {
  if (setprivPath !== undefined) return setprivPath;
  setprivPath = null;
  for (const p of ['/usr/bin/setpriv', '/bin/setpriv', '/usr/sbin/setpriv']) {
    try {
      fs.accessSync(p, fs.constants.X_OK);
      setprivPath = p;
      break;
    } catch {
      // try the next
    }
  }
  return setprivPath;
}

/** The first directory on the way to `dir` that other uids cannot traverse, or null. */
function blockedAncestor(dir: string): string | null {
  for (let d = dirname(dir); ; d = dirname(d)) {
    // A directory still to be made is made searchable (host up creates the run dir's parents 0755).
    const st = fs.statSync(d, { throwIfNoEntry: false });
    if (st && (st.mode & 0o001) === 0) return d;
    if (d === dirname(d)) return null;
  }
}

/**
 * The isolation a new host gets. `auto` is `uid` when it can be had (root, setpriv, a run dir other
 * uids can reach) and `none` with the reason otherwise; `uid` insists and fails with the reason.
 */
export function decideIsolation(want: 'auto' | IsolationMode, runDir: string, uidBase = DEFAULT_UID_BASE): Isolation {
  const none = (reason: string): Isolation => ({ mode: 'none', uidBase, reason });
  if (want === 'none') return none('--isolation none');
  let problem: { code: IsolationError['code']; text: string } | null = null;
  const euid = process.geteuid?.() ?? -1;
  if (euid !== 0) problem = { code: 'NOT_ROOT', text: `host up ran as uid ${euid}, and only root can start domains under their own uids` };
  else if (!findSetpriv()) problem = { code: 'NO_SETPRIV', text: 'setpriv (util-linux) is not installed' };
  else {
    const blocked = blockedAncestor(runDir);
    if (blocked) problem = { code: 'UNREACHABLE', text: `${blocked} (on the way to the run dir) is not searchable by other uids, so guests could not reach their xenstore sockets` };
  }
  if (!problem) return { mode: 'uid', uidBase, reason: '' };
  if (want === 'uid') throw new IsolationError(problem.code, `--isolation uid: ${problem.text}`);
  return none(problem.text);
}

/** The seccomp preload (native/seccomp-preload.ts); from source (tests) the build in dist/. */
const here = dirname(fileURLToPath(import.meta.url));
const SECCOMP_PRELOAD = import.meta.url.endsWith('.ts') ? join(here, '../../dist/native/seccomp-preload.js') : join(here, '../../native/seccomp-preload.js');

export interface Launch {
  file: string;
  args: string[];
}

/**
 * How to exec `file args` as domain `domid`: under `uid`, setpriv switches uid, gid and groups, sets
 * no_new_privs and empties every capability set (bounding set included) before the exec; node itself
 * then loads the seccomp filter (native/seccomp.ts) before the domain's own code.
 */
export function domainLaunch(iso: Isolation | undefined, domid: number, role: 'guest' | 'vtpm-domain', file: string, args: string[]): Launch {
  if (!iso || iso.mode === 'none') return { file, args };
  const setpriv = findSetpriv();
  if (!setpriv) throw new IsolationError('NO_SETPRIV', 'setpriv (util-linux) is not installed');
  const uid = domainUid(iso, domid);
  const groups = [role === 'guest' ? guestGid(iso) : vtpmDomainGid(iso)];
  return {
    file: setpriv,
    args: [
      `--reuid=${uid}`,
      `--regid=${uid}`,
      `--groups=${groups.join(',')}`,
      '--no-new-privs',
      '--inh-caps=-all',
      '--ambient-caps=-all',
      '--bounding-set=-all',
      '--',
      file,
      ...(file === process.execPath ? [`--import=${pathToFileURL(SECCOMP_PRELOAD).href}`] : []),
      ...args,
    ],
  };
}

/** The uid a process runs under (real uid from /proc/<pid>/status), or null when it is gone. */
export function processUid(pid: number): number | null {
  try {
    const m = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/**
 * The processes of domain `domid`, as destroying the domain must stop them: under `uid`, every process
 * running as the domain's uid (a pid in a guest-written record proves nothing); otherwise the recorded
 * pid, the only handle there is.
 */
export function domainProcesses(iso: Isolation | undefined, domid: number, recorded: number | undefined): number[] {
  if (!iso || iso.mode === 'none') return recorded !== undefined && recorded > 0 ? [recorded] : [];
  const uid = domainUid(iso, domid);
  const pids: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (/^\d+$/.test(name) && processUid(Number(name)) === uid) pids.push(Number(name));
  }
  return pids;
}

/** Describe the isolation for `host status`. */
export function describe(iso: Isolation | undefined): string {
  if (!iso || iso.mode === 'none') return `none${iso?.reason ? ` (${iso.reason})` : ''}`;
  return `uid (dom<N> runs as uid ${iso.uidBase}+N, no_new_privs, no capabilities, seccomp)`;
}

/** What `host up` secures, and when: a daemon that creates objects domains use has them fixed once it is ready. */
export type HostPhase = 'dirs' | 'backend';

/**
 * Modes of the host's files (docs/isolation.md). Always: state dir, logs, the manager's dir and the
 * hypervisor dir 0700, host.json 0600. Under `uid`, the run dir and the xenstore socket dir become 0711
 * (a domain reaches its own socket by name, lists nothing) and the two shared directories are opened to
 * exactly one group each. Domains get their memory and event channels as descriptors, never by path.
 */
export function secureHost(h: HostInfo, phase: HostPhase): void {
  const iso = h.isolation;
  const uidMode = iso?.mode === 'uid';
  const setMode = (p: string, mode: number, gid = 0): void => {
    if (uidMode) fs.chownSync(p, 0, gid);
    fs.chmodSync(p, mode);
  };
  const optional = (p: string, f: () => void): void => {
    if (fs.existsSync(p)) f();
  };
  if (phase === 'dirs') {
    setMode(h.runDir, uidMode ? 0o711 : 0o700);
    setMode(h.stateDir, 0o700);
    setMode(join(h.runDir, 'logs'), 0o700);
    setMode(h.domainSocketDir, uidMode ? 0o711 : 0o700);
    setMode(h.managerRunDir, 0o700);
    setMode(h.xenDir, 0o700);
    if (!uidMode) return;
    // Sticky and unlistable: a suspending guest replaces its own record and can neither list nor
    // replace anyone else's.
    setMode(join(h.runDir, 'guests'), 0o1730, guestGid(iso));
    return;
  }
  // The backend (re)creates the register dir where each vTPM domain writes its own dom<N>.json.
  if (uidMode && h.mode !== 'single') optional(join(h.runDir, 'vtpm-domains'), () => setMode(join(h.runDir, 'vtpm-domains'), 0o1730, vtpmDomainGid(iso)));
}

/** "127.0.0.1", 4321 as /proc/net/tcp writes it: "0100007F:10E1" (address bytes as a host-order word). */
function procNetAddress(ip: string, port: number): string {
  const b = ip.split('.').map(Number);
  const word = ((b[3]! << 24) | (b[2]! << 16) | (b[1]! << 8) | b[0]!) >>> 0;
  return `${word.toString(16).toUpperCase().padStart(8, '0')}:${port.toString(16).toUpperCase().padStart(4, '0')}`;
}

/**
 * The uid owning the other end of a loopback IPv4 TCP connection (from /proc/net/tcp: the socket whose
 * local address is our peer's and whose remote address is ours), or null when it cannot be told.
 */
export function tcpPeerUid(local: { address?: string; port?: number }, remote: { address?: string; port?: number }): number | null {
  const strip = (a: string | undefined): string => (a ?? '').replace(/^::ffff:/, '');
  const la = strip(local.address);
  const ra = strip(remote.address);
  if (!/^\d+\.\d+\.\d+\.\d+$/.test(la) || !/^\d+\.\d+\.\d+\.\d+$/.test(ra) || !local.port || !remote.port) return null;
  const want = `${procNetAddress(ra, remote.port)} ${procNetAddress(la, local.port)}`;
  let text: string;
  try {
    text = fs.readFileSync('/proc/net/tcp', 'latin1');
  } catch {
    return null;
  }
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length > 7 && `${f[1]} ${f[2]}` === want) return Number(f[7]);
  }
  return null;
}

/**
 * A guest's TCTI ports are its own TPM: under per-domain uids only the guest's uid and root (the host's
 * tools) may use them, as only the guest itself reaches its TPM under Xen. Same-uid hosts pass everyone.
 */
export function ownUidOrRoot(s: { localAddress?: string; localPort?: number; remoteAddress?: string; remotePort?: number }): boolean {
  const me = process.getuid?.() ?? 0;
  const peer = tcpPeerUid({ address: s.localAddress, port: s.localPort }, { address: s.remoteAddress, port: s.remotePort });
  return peer === 0 || peer === me;
}
