// Receiving file descriptors over UNIX stream sockets (SCM_RIGHTS), which Node cannot do: libuv reads
// with read(), and the kernel closes any descriptor riding on bytes read that way. QEMU hands swtpm's
// data channel over exactly like that (CMD_SET_DATAFD), so control connections are read here instead.
//
// One worker thread per process blocks in poll() over every registered socket plus a wake pipe and
// reads with recvmsg(); it posts {bytes, fds} to the main thread. Writes stay with Node's own socket
// (paused, so libuv never reads from it). The worker owns a dup() of each socket, so closing the Node
// side and removing the registration may happen in either order.
import './koffi-config.js';
import koffi from './koffi.js';
import type { Worker, MessagePort } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { EventEmitter } from 'node:events';

// worker_threads only where the reader thread runs (QEMU control connections): every other process,
// guests and vTPM domains among them, uses this file for its descriptor calls alone.
const threads = (): typeof import('node:worker_threads') => createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');

const libc = koffi.load('libc.so.6');
const c_malloc = libc.func('void *malloc(size_t size)');
const c_free = libc.func('void free(void *ptr)');
const c_recvmsg = libc.func('intptr_t recvmsg(int fd, void *msg, int flags)');
const c_poll = libc.func('int poll(void *fds, uint64_t nfds, int timeout)');
const c_pipe2 = libc.func('int pipe2(void *fds, int flags)');
const c_dup = libc.func('int fcntl(int fd, int cmd, int arg)');
const c_close = libc.func('int close(int fd)');
const c_read = libc.func('intptr_t read(int fd, void *buf, size_t n)');
const c_write = libc.func('intptr_t write(int fd, void *buf, size_t n)');
const c_errno = libc.func('int *__errno_location(void)');

const F_DUPFD_CLOEXEC = 1030;
const O_NONBLOCK = 0x800;
const O_CLOEXEC = 0x80000;
const MSG_DONTWAIT = 0x40;
const MSG_CTRUNC = 0x8;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const POLLIN = 0x1;
const EINTR = 4;
const EAGAIN = 11;

/** swtpm reads a control message into 4 + sizeof(ptm_hdata) bytes at once; so do we. */
export const RECV_CHUNK = 4104;
// Room for MAX_FDS descriptors (a cmsghdr of 16 bytes, then 4 each): the hypervisor hands a domain its
// frames in batches; on a swtpm control channel more than one fd is a protocol error reported upward.
const MAX_FDS = 64;
const CMSG_SPACE = 16 + 4 * MAX_FDS;

function errno(): number {
  return koffi.decode(c_errno(), 'int') as number;
}

/** Native scratch memory that lives as long as the process (one block per thread, never freed). */
class Scratch {
  readonly ptr: unknown;
  readonly addr: bigint;
  readonly view: DataView;
  readonly bytes: Uint8Array;
  constructor(size: number) {
    this.ptr = c_malloc(size);
    if (!this.ptr) throw new Error('malloc failed');
    this.addr = koffi.address(this.ptr) as bigint;
    const ab = koffi.view(this.ptr, size) as ArrayBuffer;
    this.view = new DataView(ab);
    this.bytes = new Uint8Array(ab);
  }
  /** For short-lived blocks; the views must not be used afterwards. */
  free(): void {
    c_free(this.ptr);
  }
}

export interface Received {
  /** Bytes read (empty with eof). */
  data: Uint8Array;
  /** Descriptors that came with them (now owned by the receiver). */
  fds: number[];
  /** True when the control message was truncated (more fds than we had room for: those are lost). */
  truncated: boolean;
}

/**
 * One recvmsg() without blocking. Returns null when nothing is ready (EAGAIN), an empty `data` at
 * end of stream; throws on other errors.
 */
function recvOnce(fd: number, s: Scratch, block = false): Received | null {
  // Layout: [0,56) msghdr, [56,72) iovec, [72,72+CMSG_SPACE) control, then the data buffer.
  const MSG = 0;
  const IOV = 56;
  const CTL = 72;
  const DATA = CTL + CMSG_SPACE;
  const v = s.view;
  s.bytes.fill(0, 0, DATA);
  v.setBigUint64(MSG + 16, s.addr + BigInt(IOV), true); // msg_iov
  v.setBigUint64(MSG + 24, 1n, true); // msg_iovlen
  v.setBigUint64(MSG + 32, s.addr + BigInt(CTL), true); // msg_control
  v.setBigUint64(MSG + 40, BigInt(CMSG_SPACE), true); // msg_controllen
  v.setBigUint64(IOV, s.addr + BigInt(DATA), true);
  v.setBigUint64(IOV + 8, BigInt(RECV_CHUNK), true);
  let n: number;
  for (;;) {
    n = Number(c_recvmsg(fd, s.ptr, (block ? 0 : MSG_DONTWAIT) | MSG_CMSG_CLOEXEC));
    if (n >= 0) break;
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return null;
    throw new Error(`recvmsg failed (errno ${e})`);
  }
  const fds: number[] = [];
  const controllen = Number(v.getBigUint64(MSG + 40, true));
  let off = 0;
  while (off + 16 <= controllen) {
    const len = Number(v.getBigUint64(CTL + off, true));
    if (len < 16 || off + len > controllen) break;
    const level = v.getInt32(CTL + off + 8, true);
    const type = v.getInt32(CTL + off + 12, true);
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = 16; p + 4 <= len; p += 4) fds.push(v.getInt32(CTL + off + p, true));
    }
    off += (len + 7) & ~7;
  }
  const flags = v.getInt32(MSG + 48, true);
  return { data: s.bytes.slice(DATA, DATA + n), fds, truncated: (flags & MSG_CTRUNC) !== 0 };
}

/** Close a descriptor we own (a received fd nobody wants). */
export function closeFd(fd: number): void {
  c_close(fd);
}


// ---------------------------------------------------------------------------------------------------
// Worker side.

type ToWorker = { op: 'add'; id: number; fd: number } | { op: 'remove'; id: number };
type FromWorker =
  | { id: number; data: Uint8Array; fds: number[]; truncated: boolean }
  | { id: number; eof: true; error?: string };

export function workerMain(wakeFd: number, port: MessagePort): void {
  const { receiveMessageOnPort } = threads();
  const scratch = new Scratch(CTL_TOTAL);
  const pollMem = new Scratch(8 * (MAX_SOCKETS + 1));
  const wakeBuf = new Scratch(64);
  const socks = new Map<number, number>(); // id -> our dup'd fd
  for (;;) {
    const entries = [...socks];
    const pv = pollMem.view;
    pv.setInt32(0, wakeFd, true);
    pv.setInt16(4, POLLIN, true);
    pv.setInt16(6, 0, true);
    entries.forEach(([, fd], i) => {
      pv.setInt32(8 * (i + 1), fd, true);
      pv.setInt16(8 * (i + 1) + 4, POLLIN, true);
      pv.setInt16(8 * (i + 1) + 6, 0, true);
    });
    const r = c_poll(pollMem.ptr, entries.length + 1, -1) as number;
    if (r < 0) {
      if (errno() === EINTR) continue;
      throw new Error(`poll failed (errno ${errno()})`);
    }
    if (pv.getInt16(6, true) !== 0) {
      while (Number(c_read(wakeFd, wakeBuf.ptr, 64)) > 0);
      for (let m = receiveMessageOnPort(port); m; m = receiveMessageOnPort(port)) {
        const msg = m.message as ToWorker | { op: 'exit' };
        if (msg.op === 'exit') {
          for (const fd of socks.values()) c_close(fd);
          return;
        }
        if (msg.op === 'add') socks.set(msg.id, msg.fd);
        else {
          const fd = socks.get(msg.id);
          if (fd !== undefined) c_close(fd);
          socks.delete(msg.id);
        }
      }
    }
    entries.forEach(([id, fd], i) => {
      if (pv.getInt16(8 * (i + 1) + 6, true) === 0 || socks.get(id) !== fd) return;
      let out: FromWorker;
      try {
        const got = recvOnce(fd, scratch);
        if (!got) return;
        out = got.data.length === 0 && got.fds.length === 0 ? { id, eof: true } : { id, ...got };
      } catch (err) {
        out = { id, eof: true, error: (err as Error).message };
      }
      if ('eof' in out) {
        c_close(fd);
        socks.delete(id);
      }
      port.postMessage(out);
    });
  }
}

const CTL_TOTAL = 72 + CMSG_SPACE + RECV_CHUNK;
const MAX_SOCKETS = 4096;


// ---------------------------------------------------------------------------------------------------
// Main-thread side.

/** Events: 'data' (Received), 'end' (error?: string). */
export class RightsSocket extends EventEmitter {
  readonly id: number;
  #reader: RightsReader;
  #closed = false;
  constructor(id: number, reader: RightsReader) {
    super();
    this.id = id;
    this.#reader = reader;
  }
  /** Stop reading (closes our dup; the caller still closes its own socket). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#reader.remove(this.id);
  }
  get closed(): boolean {
    return this.#closed;
  }
}

export class RightsReader {
  static #shared: RightsReader | null = null;
  readonly #worker: Worker;
  readonly #port: MessagePort;
  readonly #wakeW: number;
  readonly #wakeBuf = new Scratch(1);
  readonly #socks = new Map<number, RightsSocket>();
  #nextId = 1;

  private constructor() {
    const pipe = new Scratch(8);
    if ((c_pipe2(pipe.ptr, O_CLOEXEC | O_NONBLOCK) as number) !== 0) throw new Error(`pipe2 failed (errno ${errno()})`);
    const wakeR = pipe.view.getInt32(0, true);
    this.#wakeW = pipe.view.getInt32(4, true);
    const { Worker, MessageChannel } = threads();
    const { port1, port2 } = new MessageChannel();
    this.#port = port1;
    this.#worker = new Worker(new URL('./unix-rights-worker.js', import.meta.url), {
      workerData: { wakeFd: wakeR, port: port2 },
      transferList: [port2],
    });
    this.#worker.unref();
    this.#worker.on('error', (err) => {
      for (const s of this.#socks.values()) s.emit('end', `reader thread failed: ${err.message}`);
      this.#socks.clear();
    });
    port1.on('message', (m: FromWorker) => {
      const s = this.#socks.get(m.id);
      if (!s) {
        if (!('eof' in m)) for (const fd of m.fds) c_close(fd);
        return;
      }
      if ('eof' in m) {
        this.#socks.delete(m.id);
        s.emit('end', m.error);
      } else s.emit('data', { data: m.data, fds: m.fds, truncated: m.truncated } satisfies Received);
    });
    port1.unref();
  }

  /** The process's reader thread (started on first use). */
  static shared(): RightsReader {
    if (!RightsReader.#shared) {
      const r = new RightsReader();
      RightsReader.#shared = r;
      // A thread blocked in poll() cannot be terminated, and Node joins workers at exit: wake it first.
      process.once('exit', () => r.#shutdown());
    }
    return RightsReader.#shared;
  }

  #shutdown(): void {
    this.#port.postMessage({ op: 'exit' });
    this.#wakeBuf.bytes[0] = 1;
    c_write(this.#wakeW, this.#wakeBuf.ptr, 1);
  }

  /**
   * Read `fd` (a connected UNIX stream socket whose Node owner is paused) with recvmsg from now on.
   * The fd is dup'd: the caller keeps and eventually closes its own.
   */
  add(fd: number): RightsSocket {
    // The poll set lives in a fixed block sized for MAX_SOCKETS (plus the wake pipe).
    if (this.#socks.size >= MAX_SOCKETS) throw new Error(`more than ${MAX_SOCKETS} control connections`);
    const dupfd = c_dup(fd, F_DUPFD_CLOEXEC, 0) as number;
    if (dupfd < 0) throw new Error(`dup failed (errno ${errno()})`);
    const id = this.#nextId++;
    const s = new RightsSocket(id, this);
    this.#socks.set(id, s);
    this.#post({ op: 'add', id, fd: dupfd });
    return s;
  }

  remove(id: number): void {
    if (!this.#socks.delete(id)) return;
    this.#post({ op: 'remove', id });
  }

  #post(m: ToWorker): void {
    this.#port.postMessage(m);
    this.#wakeBuf.bytes[0] = 1;
    c_write(this.#wakeW, this.#wakeBuf.ptr, 1);
  }
}

// ---------------------------------------------------------------------------------------------------
// The sending side, as QEMU does it (socketpair + sendmsg with SCM_RIGHTS): for clients and tests.

const c_socketpair = libc.func('int socketpair(int domain, int type, int protocol, void *sv)');
const c_sendmsg = libc.func('intptr_t sendmsg(int fd, void *msg, int flags)');
const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0x80000;
const MSG_NOSIGNAL = 0x4000;

/** socketpair(AF_UNIX, SOCK_STREAM): two connected descriptors (close them, or hand them to net.Socket). */
export function socketPair(): [number, number] {
  const s = new Scratch(8);
  try {
    if ((c_socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s.ptr) as number) !== 0) throw new Error(`socketpair failed (errno ${errno()})`);
    return [s.view.getInt32(0, true), s.view.getInt32(4, true)];
  } finally {
    s.free();
  }
}

/** One sendmsg() of `data` (≤ RECV_CHUNK bytes) with `fds` attached; returns bytes sent. */
export function sendWithFds(fd: number, data: Uint8Array, fds: readonly number[]): number {
  if (data.length === 0 || data.length > RECV_CHUNK) throw new RangeError('sendWithFds: 1..4104 bytes');
  if (fds.length > MAX_FDS) throw new RangeError(`sendWithFds: at most ${MAX_FDS} fds`);
  const s = new Scratch(72 + CMSG_SPACE + RECV_CHUNK);
  s.bytes.fill(0, 0, 72 + CMSG_SPACE);
  const v = s.view;
  const CTL = 72;
  const DATA = CTL + CMSG_SPACE;
  s.bytes.set(data, DATA);
  v.setBigUint64(16, s.addr + 56n, true);
  v.setBigUint64(24, 1n, true);
  v.setBigUint64(56, s.addr + BigInt(DATA), true);
  v.setBigUint64(64, BigInt(data.length), true);
  if (fds.length > 0) {
    const len = 16 + 4 * fds.length;
    v.setBigUint64(32, s.addr + BigInt(CTL), true);
    v.setBigUint64(40, BigInt((len + 7) & ~7), true);
    v.setBigUint64(CTL, BigInt(len), true);
    v.setInt32(CTL + 8, SOL_SOCKET, true);
    v.setInt32(CTL + 12, SCM_RIGHTS, true);
    fds.forEach((f, i) => v.setInt32(CTL + 16 + 4 * i, f, true));
  }
  const n = Number(c_sendmsg(fd, s.ptr, MSG_NOSIGNAL));
  const e = errno();
  s.free();
  if (n < 0) throw new Error(`sendmsg failed (errno ${e})`);
  return n;
}

// ---------------------------------------------------------------------------------------------------
// Synchronous request/response over a blocking socket (a domain's hypercall connection).

let syncScratch: Scratch | null = null;

/** One blocking recvmsg() on a blocking socket: bytes (empty at end of stream) and the fds with them. */
export function recvBlocking(fd: number): Received {
  syncScratch ??= new Scratch(CTL_TOTAL);
  return recvOnce(fd, syncScratch, true)!;
}

const c_socket = libc.func('int socket(int domain, int type, int protocol)');
const c_connect = libc.func('int connect(int fd, void *addr, uint32_t len)');

/** A blocking connection to the UNIX stream socket at `path` (CLOEXEC); throws with errno on failure. */
export function connectUnix(path: string): number {
  const name = Buffer.from(path);
  if (name.length > 107) throw new RangeError(`socket path too long: ${path}`);
  const fd = c_socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw new Error(`socket failed (errno ${errno()})`);
  const addr = new Scratch(110);
  try {
    addr.bytes.fill(0);
    addr.view.setUint16(0, AF_UNIX, true);
    addr.bytes.set(name, 2);
    if ((c_connect(fd, addr.ptr, 2 + name.length + 1) as number) !== 0) {
      const e = errno();
      c_close(fd);
      throw Object.assign(new Error(`connect ${path} failed (errno ${e})`), { errno: e });
    }
    return fd;
  } finally {
    addr.free();
  }
}
