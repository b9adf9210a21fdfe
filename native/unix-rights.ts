// Receiving file descriptors over UNIX stream sockets (SCM_RIGHTS), which Node cannot do: libuv reads
// with read(), and the kernel closes any descriptor riding on bytes read that way. QEMU hands swtpm's
// data channel over exactly like that (CMD_SET_DATAFD), so control connections are read here instead.
//
// libuv's poll watcher tells the main thread when a registered socket is readable and it reads with
// recvmsg() right there (see RightsReader). Writes stay with Node's own socket (paused, so libuv never
// reads from it). The reader owns a dup() of each socket, so closing the Node side and removing the
// registration may happen in either order.
import './koffi-config.js';
import koffi from './koffi.js';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';


const libc = koffi.load('libc.so.6');
const c_malloc = libc.func('void *malloc(size_t size)');
const c_free = libc.func('void free(void *ptr)');
const c_recvmsg = libc.func('intptr_t recvmsg(int fd, void *msg, int flags)');
const c_dup = libc.func('int fcntl(int fd, int cmd, int arg)');
const c_close = libc.func('int close(int fd)');
const c_errno = libc.func('int *__errno_location(void)');

const F_DUPFD_CLOEXEC = 1030;
const MSG_DONTWAIT = 0x40;
const MSG_CTRUNC = 0x8;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const EINTR = 4;
const EAGAIN = 11;

/** swtpm reads a control message into 4 + sizeof(ptm_hdata) bytes at once; so do we. */
export const RECV_CHUNK = 4104;
// Room for MAX_FDS descriptors (a cmsghdr of 16 bytes, then 4 each): the hypervisor hands a domain its
// frames in batches; on a swtpm control channel more than one fd is a protocol error reported upward.
const MAX_FDS = 64;
const CMSG_SPACE = 16 + 4 * MAX_FDS;
/** msghdr + iovec + control + one chunk of data: the scratch block of recvOnce. */
const CTL_TOTAL = 72 + CMSG_SPACE + RECV_CHUNK;

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
/** Scratch blocks whose msghdr and iovec already point into themselves (recvOnce lays them out once). */
const laidOut = new WeakSet<Scratch>();

function recvOnce(fd: number, s: Scratch, block = false): Received | null {
  // Layout: [0,56) msghdr, [56,72) iovec, [72,72+CMSG_SPACE) control, then the data buffer.
  const MSG = 0;
  const IOV = 56;
  const CTL = 72;
  const DATA = CTL + CMSG_SPACE;
  const v = s.view;
  if (!laidOut.has(s)) {
    s.bytes.fill(0, 0, DATA);
    v.setBigUint64(MSG + 16, s.addr + BigInt(IOV), true); // msg_iov
    v.setBigUint64(MSG + 24, 1n, true); // msg_iovlen
    v.setBigUint64(MSG + 32, s.addr + BigInt(CTL), true); // msg_control
    v.setBigUint64(IOV, s.addr + BigInt(DATA), true);
    v.setBigUint64(IOV + 8, BigInt(RECV_CHUNK), true);
    laidOut.add(s);
  }
  // recvmsg rewrites only these two (and msg_namelen, 0 with no name).
  v.setBigUint64(MSG + 40, BigInt(CMSG_SPACE), true); // msg_controllen
  v.setInt32(MSG + 48, 0, true); // msg_flags
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
// The reader: libuv's own poll watcher (uv_poll_t) on the main thread's loop, driven through koffi.
// Node exports libuv's symbols, so a dup of each control socket is watched for readability by the same
// epoll that serves every other socket, and the callback reads it with recvmsg(): no thread hand-off
// on the control path. A dup, because libuv keeps one watcher per descriptor and the Node socket
// (paused, used for writing) owns the original.

const node = koffi.load(null);
const UV_POLL = 8; // uv_handle_type
const UV_READABLE = 1;
// koffi's type names are process-wide and this module may be evaluated more than once in a process
// (test runners re-import per file): a fresh suffix per evaluation keeps them distinct.
const SUFFIX = randomBytes(6).toString('hex');
const PollCb = koffi.proto(`void vtpm_uv_poll_cb_${SUFFIX}(void *handle, int status, int events)`);
const CloseCb = koffi.proto(`void vtpm_uv_close_cb_${SUFFIX}(void *handle)`);
const uv_default_loop = node.func('void *uv_default_loop(void)');
const uv_handle_size = node.func('size_t uv_handle_size(int type)');
const uv_poll_init = node.func('int uv_poll_init(void *loop, void *handle, int fd)');
const uv_poll_start = node.func('int uv_poll_start(void *handle, int events, void *cb)');
const uv_poll_stop = node.func('int uv_poll_stop(void *handle)');
const uv_close = node.func('void uv_close(void *handle, void *cb)');
const uv_unref = node.func('void uv_unref(void *handle)');
/** recvmsg() calls per readiness callback: a state blob (~10 KiB) arrives in one go, a flood yields. */
const READS_PER_WAKE = 8;

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

interface Watched {
  sock: RightsSocket;
  fd: number;
  handle: unknown;
}

export class RightsReader {
  static #shared: RightsReader | null = null;
  readonly #scratch = new Scratch(CTL_TOTAL);
  readonly #handleSize = Number(uv_handle_size(UV_POLL));
  /** By the uv_poll_t's address (what the callback is given). */
  readonly #byHandle = new Map<bigint, Watched>();
  readonly #byId = new Map<number, Watched>();
  readonly #onPoll: unknown;
  readonly #onClose: unknown;
  #nextId = 1;

  private constructor() {
    // Registered once for the process: every watcher shares the two trampolines.
    this.#onPoll = koffi.register((h: unknown, status: number) => this.#ready(h, status), koffi.pointer(PollCb));
    this.#onClose = koffi.register((h: unknown) => c_free(h), koffi.pointer(CloseCb));
  }

  /** The process's reader (made on first use). */
  static shared(): RightsReader {
    RightsReader.#shared ??= new RightsReader();
    return RightsReader.#shared;
  }

  /**
   * Read `fd` (a connected UNIX stream socket whose Node owner is paused) with recvmsg from now on.
   * The fd is dup'd: the caller keeps and eventually closes its own.
   */
  add(fd: number): RightsSocket {
    const dupfd = c_dup(fd, F_DUPFD_CLOEXEC, 0) as number;
    if (dupfd < 0) throw new Error(`dup failed (errno ${errno()})`);
    const handle = c_malloc(this.#handleSize);
    if (!handle) {
      c_close(dupfd);
      throw new Error('malloc failed');
    }
    let rc = uv_poll_init(uv_default_loop(), handle, dupfd) as number;
    if (rc === 0) rc = uv_poll_start(handle, UV_READABLE, this.#onPoll) as number;
    if (rc !== 0) {
      c_close(dupfd);
      c_free(handle);
      throw new Error(`uv_poll on a control socket failed (${rc})`);
    }
    // Like a paused socket, a watcher alone does not keep the process alive.
    uv_unref(handle);
    const id = this.#nextId++;
    const w: Watched = { sock: new RightsSocket(id, this), fd: dupfd, handle };
    this.#byHandle.set(koffi.address(handle) as bigint, w);
    this.#byId.set(id, w);
    return w.sock;
  }

  remove(id: number): void {
    const w = this.#byId.get(id);
    if (w) this.#drop(w);
  }

  #drop(w: Watched): void {
    this.#byId.delete(w.sock.id);
    this.#byHandle.delete(koffi.address(w.handle) as bigint);
    uv_poll_stop(w.handle);
    c_close(w.fd);
    uv_close(w.handle, this.#onClose); // frees the handle once libuv lets go of it
  }

  /** libuv says the socket is readable (or failed): read what is there and hand it on. */
  #ready(handle: unknown, status: number): void {
    const w = this.#byHandle.get(koffi.address(handle) as bigint);
    if (!w) return;
    try {
      if (status < 0) throw new Error(`poll failed (${status})`);
      for (let i = 0; i < READS_PER_WAKE && this.#byId.has(w.sock.id); i++) {
        const got = recvOnce(w.fd, this.#scratch);
        if (!got) return;
        if (got.data.length === 0 && got.fds.length === 0) {
          this.#drop(w);
          w.sock.emit('end');
          return;
        }
        w.sock.emit('data', got);
        if (got.data.length < RECV_CHUNK) return;
      }
    } catch (err) {
      // An exception must not unwind into libuv: the socket alone ends.
      if (this.#byId.has(w.sock.id)) this.#drop(w);
      w.sock.emit('end', (err as Error).message);
    }
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
