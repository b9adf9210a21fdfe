// The hypercall wire (docs/hypervisor.md): how a domain asks the hypervisor process for its memory,
// for a granted frame and for event channels. One UNIX stream connection per domain, whose identity is
// the connection itself (the hypervisor made it when it created the domain); dom0's toolstack creates
// domains over the control socket. Every call is one 32-byte request and one 32-byte reply, with the
// descriptors the reply hands over attached as SCM_RIGHTS. The caller blocks: hypercalls sit on the
// set-up paths (create, populate, map, bind), never on the data path.
//
//   request  u32 op | u32 a0 .. a6                       (little-endian)
//   reply    i32 status | u32 nfds | u32 r0 .. r5        status 0 ok, <0 -errno or GNTST_*
import { join } from 'node:path';
import { closeFd, connectUnix, recvBlocking, sendWithFds } from '../../native/unix-rights.js';
import { trace, tracing } from '../util/trace.js';

export const HC_MSG = 32;

/** Frames handed over in one populate reply (native/unix-rights.ts takes 64 descriptors a message). */
export const POPULATE_MAX = 64;

/** dom0's toolstack socket in the hypervisor directory (mode 0600). */
export function hypervisorSocket(dir: string): string {
  return join(dir, 'hypervisor.sock');
}

export const HC = {
  /** dom0 control: create domain a0 (nr_pages a1, grant_frames a2, max_ports a3); fds: its connection. */
  domctl_create: 1,
  /** The caller's own memory: r0 domid, r1 nr_pages, r2 grant_frames, r3 max_ports; fds: control memfd. */
  domain_info: 2,
  /** XENMEM_populate_physmap: frames a0 .. a0+a1-1 (a1 ≤ 64); fds: one memfd per frame. */
  populate: 3,
  /** GNTTABOP_map_grant_ref: granter a0, ref a1, readonly a2: r0 handle; fds: the frame (read-only fd if a2). */
  map_grant: 4,
  /** GNTTABOP_unmap_grant_ref: the handle a0 map_grant returned. */
  unmap_grant: 5,
  /** EVTCHNOP_alloc_unbound for remote a0: r0 port, r1 word; fds: channel page, wake-up socket. */
  evtchn_alloc_unbound: 6,
  /** EVTCHNOP_bind_interdomain to a0's port a1: r0 local port, r1 word; fds: page, socket. */
  evtchn_bind_interdomain: 7,
  /** EVTCHNOP_close of port a0. */
  evtchn_close: 8,
  /** EVTCHNOP_status of port a0: r0 state, r1 remote domid, r2 remote port. */
  evtchn_status: 9,
  /** dom0 control: whether domain a0 exists (status 0) or not (-ESRCH). */
  domctl_getinfo: 10,
  /** XENMEM_decrease_reservation: give frames a0 .. a0+a1-1 back; the next populate gets fresh ones. */
  decrease_reservation: 11,
} as const;

export const HC_NAMES = new Map<number, string>(Object.entries(HC).map(([k, v]) => [v, k]));

export const EPERM = 1;
export const ESRCH = 3;
export const EINVAL = 22;
export const ENOMEM = 12;
export const ENOSPC = 28;
export const EEXIST = 17;

export class HypercallError extends Error {
  constructor(
    readonly op: number,
    readonly status: number,
    message: string,
  ) {
    super(`${HC_NAMES.get(op) ?? `op ${op}`}: ${message} (status ${status})`);
    this.name = 'HypercallError';
  }
}

export interface Reply {
  status: number;
  r: number[];
  fds: number[];
}

export function encodeRequest(op: number, args: readonly number[]): Uint8Array {
  const b = Buffer.alloc(HC_MSG);
  b.writeUInt32LE(op, 0);
  args.forEach((a, i) => b.writeUInt32LE(a >>> 0, 4 + 4 * i));
  return b;
}

export function encodeReply(status: number, r: readonly number[], nfds: number): Uint8Array {
  const b = Buffer.alloc(HC_MSG);
  b.writeInt32LE(status, 0);
  b.writeUInt32LE(nfds, 4);
  r.forEach((v, i) => b.writeUInt32LE(v >>> 0, 8 + 4 * i));
  return b;
}

/** Posted calls whose replies may wait unread before a call waits for them all (a few KiB of socket). */
const POSTED_MAX = 64;

interface Started {
  op: number;
  reply: Reply | null;
  /** Why its reply could not be read (the hypervisor went away): thrown by its finish. */
  error?: unknown;
}

/** A domain's (or the toolstack's) end of a hypercall connection: blocking calls, one at a time. */
export class HypercallClient {
  #fd: number;
  /** Replies owed to `post`ed calls, read (and dropped) before the next call's. */
  #owed = 0;
  /** A `start`ed call whose reply is not read yet. */
  #started: Started | null = null;

  constructor(fd: number) {
    this.#fd = fd;
  }

  /** The toolstack's connection to the hypervisor of directory `dir` (its control socket). */
  static control(socketPath: string): HypercallClient {
    return new HypercallClient(connectUnix(socketPath));
  }

  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** Make the call; throws HypercallError on a failure status (closing any fds that came anyway). */
  call(op: number, args: readonly number[] = [], message?: (status: number) => string): Reply {
    const rep = this.tryCall(op, args);
    if (rep.status !== 0) {
      for (const fd of rep.fds) closeFd(fd);
      throw new HypercallError(op, rep.status, message?.(rep.status) ?? `failed`);
    }
    return rep;
  }

  /**
   * Send a call whose answer nobody waits for (a close or an unmap on a teardown path): the caller goes
   * on without waiting for the hypervisor process to run. The hypervisor handles one connection's calls
   * in order, so every later call of this domain sees its effect; other domains see it once the
   * hypervisor has run, a moment later (a granter's end_access retries until then).
   */
  post(op: number, args: readonly number[] = []): void {
    if (this.#fd < 0) throw new HypercallError(op, -ESRCH, 'connection to the hypervisor closed');
    // A started call's reply comes before this one's: read it first, so #drain counts only posted ones.
    if (this.#started) this.#settle();
    if (this.#owed >= POSTED_MAX) this.#drain();
    if (tracing) trace(`hc >> ${HC_NAMES.get(op) ?? op} ${args.join(' ')}`);
    sendWithFds(this.#fd, encodeRequest(op, args), []);
    this.#owed++;
  }

  /** Read the replies owed to posted calls; nothing else is outstanding, so every byte is theirs. */
  #drain(): void {
    let want = this.#owed * HC_MSG;
    this.#owed = 0;
    while (want > 0) {
      const r = recvBlocking(this.#fd);
      for (const fd of r.fds) closeFd(fd);
      // The hypervisor is gone: the call that follows finds that out itself.
      if (r.data.length === 0) return;
      want -= r.data.length;
    }
  }

  /**
   * Send a call now and take its reply later (`finish`, whatever its status), so the hypervisor process
   * runs it while the caller does work of its own. A call made meanwhile reads this reply first and
   * keeps it for `finish`.
   */
  start(op: number, args: readonly number[] = []): { finish: () => Reply } {
    if (this.#fd < 0) throw new HypercallError(op, -ESRCH, 'connection to the hypervisor closed');
    this.#settle();
    if (tracing) trace(`hc >| ${HC_NAMES.get(op) ?? op} ${args.join(' ')}`);
    sendWithFds(this.#fd, encodeRequest(op, args), []);
    const call: Started = { op, reply: null };
    this.#started = call;
    return {
      finish: () => {
        if (this.#started === call) this.#settle();
        if (!call.reply) throw call.error;
        return call.reply;
      },
    };
  }

  /** Read what earlier calls are owed: posted calls' replies, then a started call's (kept for it). */
  #settle(): void {
    if (this.#owed > 0) this.#drain();
    const s = this.#started;
    if (!s) return;
    this.#started = null;
    try {
      s.reply = this.#readReply(s.op);
    } catch (err) {
      s.error = err;
    }
  }

  /** Make the call and return the reply whatever its status. */
  tryCall(op: number, args: readonly number[] = []): Reply {
    if (this.#fd < 0) throw new HypercallError(op, -ESRCH, 'connection to the hypervisor closed');
    this.#settle();
    if (tracing) trace(`hc > ${HC_NAMES.get(op) ?? op} ${args.join(' ')}`);
    sendWithFds(this.#fd, encodeRequest(op, args), []);
    return this.#readReply(op);
  }

  #readReply(op: number): Reply {
    const buf = new Uint8Array(HC_MSG);
    const fds: number[] = [];
    let got = 0;
    while (got < HC_MSG) {
      const r = recvBlocking(this.#fd);
      fds.push(...r.fds);
      if (r.data.length === 0) {
        for (const fd of fds) closeFd(fd);
        throw new HypercallError(op, -ESRCH, 'the hypervisor closed the connection');
      }
      buf.set(r.data.subarray(0, HC_MSG - got), got);
      got += r.data.length;
    }
    const dv = new DataView(buf.buffer);
    const status = dv.getInt32(0, true);
    const nfds = dv.getUint32(4, true);
    if (nfds !== fds.length) {
      for (const fd of fds) closeFd(fd);
      throw new HypercallError(op, -EINVAL, `reply announced ${nfds} descriptors, ${fds.length} came`);
    }
    const r = [0, 1, 2, 3, 4, 5].map((i) => dv.getUint32(8 + 4 * i, true));
    if (tracing) trace(`hc < ${HC_NAMES.get(op) ?? op} ${status}`);
    return { status, r, fds };
  }

  close(): void {
    if (this.#fd < 0) return;
    closeFd(this.#fd);
    this.#fd = -1;
  }
}
