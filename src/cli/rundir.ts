// A host's run directory: where `host up` puts sockets, FIFOs, logs and host.json, and where every
// other command finds them. One place for the layout so the processes agree on it.
import fs from 'node:fs';
import { createHash } from 'node:crypto';
import { join, resolve } from 'node:path';
import type { Isolation } from './isolation.js';
import type { StoreFlags } from './store-flags.js';
import type { PlatformIdentity } from '../manager/ca-files.js';

export interface ProcessEntry {
  role: 'hypervisor' | 'xenstored' | 'manager' | 'backend' | 'guest' | 'vtpm-domain';
  domid: number;
  pid: number;
  [k: string]: unknown;
}

/** single: vTPMs in the backend; multi: a vTPM domain each behind dom0's backend; stubdom: the vTPM domain is the backend. */
export type HostMode = 'single' | 'multi' | 'stubdom';

export interface HostInfo {
  mode: HostMode;
  runDir: string;
  stateDir: string;
  xenDir: string;
  xenstoredSocket: string;
  domainSocketDir: string;
  managerRunDir: string;
  started: string;
  processes: ProcessEntry[];
  /** `host up --metrics HOST:PORT`: where the backend serves the whole host's metrics. */
  metrics?: string;
  /** `host up --log-format`: every daemon's log format (default text). */
  logFormat?: 'text' | 'json';
  /** Absent in host.json written before isolation existed: read as `none`. */
  isolation?: Isolation;
  /** `host up --ca DIR`: the operator's EK CA the manager signs with (absent: the host CA in the state dir). */
  ca?: string;
  /** `host up --ek-certs`: what a new TPM gets when its attach does not choose (absent: both). */
  ekCerts?: string;
  /** `host up --platform-*`: what new TPMs' platform certificates name (absent: the manager's defaults). */
  platform?: Partial<PlatformIdentity>;
  /** The manager's etcd store (--store …); absent: the local store in stateDir. */
  store?: StoreFlags;
}

export interface GuestInfo {
  domid: number;
  pid: number;
  /** procStat(pid).start when it was spawned: tells our guest from a later process with its pid. */
  start?: number;
  vm: string;
  protocol: 'v2' | 'ring';
  tctiPort?: number;
  devid: number;
  /** Suspend/resume (issue 7): set by a suspended guest for its resume. */
  suspended?: boolean;
  /** The next ring request id (decimal u64): ids are never reused across suspend. */
  nextId?: string;
  /** Ring requests sent and not answered when the guest suspended: {id, command hex, locality}. */
  inflight?: { id: string; command: string; locality: number }[];
  /** A stress workload this guest runs (vtpm stress), kept so resume continues it. */
  workload?: string;
}

/** No host.json in the run directory. */
export class NoHostError extends Error {
  readonly code = 'NO_HOST';
}

export class RunDir {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = resolve(dir);
  }

  get hostJson(): string {
    return join(this.dir, 'host.json');
  }
  get logDir(): string {
    return join(this.dir, 'logs');
  }
  get guestDir(): string {
    return join(this.dir, 'guests');
  }
  log(name: string): string {
    return join(this.logDir, `${name}.log`);
  }

  /** The layout for a new host in this directory. */
  plan(stateDir: string, mode: HostMode): HostInfo {
    // Domain memory lives in /dev/shm (tmpfs) so mapping it never touches a disk; one directory per
    // run dir, named from its path, so two hosts on one machine never share domids.
    const tag = createHash('sha256').update(this.dir).digest('hex').slice(0, 12);
    return {
      mode,
      runDir: this.dir,
      stateDir: resolve(stateDir),
      xenDir: `/dev/shm/vtpm-split-${tag}`,
      xenstoredSocket: join(this.dir, 'xenstored.sock'),
      domainSocketDir: join(this.dir, 'xs'),
      managerRunDir: join(this.dir, 'manager'),
      started: new Date().toISOString(),
      processes: [],
    };
  }

  readHost(): HostInfo {
    let text: string;
    try {
      text = fs.readFileSync(this.hostJson, 'utf8');
    } catch {
      const what = fs.existsSync(this.dir) ? `no host.json in ${this.dir}` : `${this.dir} does not exist`;
      throw new NoHostError(`no host is up in ${this.dir} (${what}; start one with \`vtpm host up --run ${this.dir} --state DIR\`)`);
    }
    return JSON.parse(text) as HostInfo;
  }

  writeHost(h: HostInfo): void {
    const tmp = `${this.hostJson}.tmp`;
    // Root-only: it names every daemon's pid and the state dir (docs/isolation.md).
    fs.rmSync(tmp, { force: true });
    fs.writeFileSync(tmp, JSON.stringify(h, null, 2) + '\n', { mode: 0o600 });
    fs.renameSync(tmp, this.hostJson);
  }

  guestFile(domid: number): string {
    return join(this.guestDir, `dom${domid}.json`);
  }

  /**
   * `owner`: the guest's uid when domains run under their own uids, so the guest can replace its own
   * record when it suspends (the guest dir is sticky: nobody else's record can be replaced).
   */
  writeGuest(g: GuestInfo, owner?: number): void {
    fs.mkdirSync(this.guestDir, { recursive: true });
    // Write-then-rename: a guest killed while saving its resume state leaves the old file whole.
    const tmp = `${this.guestFile(g.domid)}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(g, null, 2) + '\n', { mode: 0o600 });
    if (owner !== undefined) fs.chownSync(tmp, owner, owner);
    fs.renameSync(tmp, this.guestFile(g.domid));
  }

  readGuest(domid: number): GuestInfo | null {
    try {
      return JSON.parse(fs.readFileSync(this.guestFile(domid), 'utf8')) as GuestInfo;
    } catch {
      return null;
    }
  }

  removeGuest(domid: number): void {
    fs.rmSync(this.guestFile(domid), { force: true });
  }

  guests(): GuestInfo[] {
    let names: string[];
    try {
      names = fs.readdirSync(this.guestDir);
    } catch {
      return [];
    }
    return names
      .filter((n) => /^dom\d+\.json$/.test(n))
      .map((n) => this.readGuest(Number(n.slice(3, -5))))
      .filter((g): g is GuestInfo => g !== null);
  }

  /** vTPM-domain processes register themselves here in multi-VM mode (one JSON file each). */
  get vtpmDomainDir(): string {
    return join(this.dir, 'vtpm-domains');
  }
}

// Process liveness is shared with the hypervisor and the manager (src/util/proc.ts).
export { procStat, processAlive as alive } from '../util/proc.js';
