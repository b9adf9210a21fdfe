// The libc calls the emulated hypervisor needs and Node does not offer: mmap/munmap of shared files
// (so two processes see the same bytes), memfd_create, and typed views over the mapped memory.
// Nothing outside native/ imports koffi; callers get ArrayBuffers and plain numbers.
import './koffi-config.js';
import koffi from './koffi.js';

const libc = koffi.load('libc.so.6');

const PROT_READ = 0x1;
const PROT_WRITE = 0x2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
export const PAGE_SIZE = 4096;

const c_mmap = libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)');
// The same call with the address as an integer, for MAP_FIXED placement inside a reserved range.
const c_mmap_at = libc.func('void *mmap(uint64_t addr, size_t length, int prot, int flags, int fd, int64_t offset)');
const c_munmap = libc.func('int munmap(void *addr, size_t length)');
const c_memfd_create = libc.func('int memfd_create(const char *name, unsigned int flags)');
const c_errno = libc.func('int *__errno_location(void)');
const c_strerror = libc.func('const char *strerror(int errnum)');

export class NativeError extends Error {
  constructor(
    readonly call: string,
    readonly errno: number,
  ) {
    super(`${call} failed: ${c_strerror(errno) as string} (errno ${errno})`);
    this.name = 'NativeError';
  }
}

function lastErrno(): number {
  return koffi.decode(c_errno(), 'int') as number;
}

/**
 * A shared mapping of part of a file. `buffer` aliases the mapped pages directly (no copy), so an
 * Atomics store here is seen by every process that maps the same file page.
 * After unmap() the buffer must not be touched: the pages are gone and access would fault, so the
 * object drops its own reference and callers should drop theirs.
 */
export class Mapping {
  #ptr: unknown;
  #buffer: ArrayBuffer | null;
  readonly length: number;
  readonly writable: boolean;

  constructor(ptr: unknown, length: number, writable: boolean) {
    this.#ptr = ptr;
    this.length = length;
    this.writable = writable;
    this.#buffer = koffi.view(ptr, length) as ArrayBuffer;
  }

  get buffer(): ArrayBuffer {
    if (!this.#buffer) throw new Error('mapping used after unmap');
    return this.#buffer;
  }

  get mapped(): boolean {
    return this.#buffer !== null;
  }

  unmap(): void {
    if (!this.#buffer) return;
    this.#buffer = null;
    if ((c_munmap(this.#ptr, this.length) as number) !== 0) throw new NativeError('munmap', lastErrno());
    this.#ptr = null;
  }
}

/**
 * Map `length` bytes of `fd` at `offset` (both multiples of PAGE_SIZE) shared. A read-only mapping
 * is enforced by the MMU: a write through it faults, which is exactly what a read-only grant means.
 */
export function mapShared(fd: number, offset: number, length: number, writable: boolean): Mapping {
  if (offset % PAGE_SIZE !== 0 || length <= 0 || length % PAGE_SIZE !== 0) {
    throw new RangeError(`mapShared: offset ${offset} and length ${length} must be positive page multiples`);
  }
  const prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  const ptr = c_mmap(null, length, prot, MAP_SHARED, fd, offset);
  // MAP_FAILED is (void *)-1.
  if (koffi.address(ptr) === 0xffffffffffffffffn) throw new NativeError('mmap', lastErrno());
  return new Mapping(ptr, length, writable);
}

export interface PageSource {
  fd: number;
  offset: number;
  writable: boolean;
}

/**
 * Map pages from (possibly different) files side by side into one contiguous virtual range, as Xen
 * backends vmap the granted pages of a multi-page ring: reserve the range PROT_NONE, then MAP_FIXED
 * each page into its slot. The result is one Mapping; unmap() releases the whole range.
 */
export function mapPagesContiguous(pages: readonly PageSource[]): Mapping {
  if (pages.length === 0) throw new RangeError('mapPagesContiguous: no pages');
  if (pages.length === 1) return mapShared(pages[0]!.fd, pages[0]!.offset, PAGE_SIZE, pages[0]!.writable);
  const length = pages.length * PAGE_SIZE;
  const base = c_mmap(null, length, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (koffi.address(base) === 0xffffffffffffffffn) throw new NativeError('mmap', lastErrno());
  const baseAddr = koffi.address(base) as bigint;
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i]!;
    if (p.offset % PAGE_SIZE !== 0) {
      c_munmap(base, length);
      throw new RangeError(`mapPagesContiguous: offset ${p.offset} is not page aligned`);
    }
    const at = baseAddr + BigInt(i * PAGE_SIZE);
    const prot = p.writable ? PROT_READ | PROT_WRITE : PROT_READ;
    const got = c_mmap_at(at, PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, p.fd, p.offset);
    if (koffi.address(got) === 0xffffffffffffffffn) {
      const e = lastErrno();
      c_munmap(base, length);
      throw new NativeError('mmap', e);
    }
  }
  return new Mapping(base, length, pages.every((p) => p.writable));
}

const MFD_CLOEXEC = 0x1;
const MFD_ALLOW_SEALING = 0x2;
const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
const c_fcntl = libc.func('int fcntl(int fd, int cmd, int arg)');
const c_ftruncate = libc.func('int ftruncate(int fd, int64_t length)');
const c_fchmod = libc.func('int fchmod(int fd, uint32_t mode)');

/** An anonymous memory file (distinct inode each call); close it with fs.closeSync. */
export function memfdCreate(name: string): number {
  const fd = c_memfd_create(name, MFD_CLOEXEC) as number;
  if (fd < 0) throw new NativeError('memfd_create', lastErrno());
  return fd;
}

/**
 * Memory no holder can resize: a memfd of `length` bytes sealed against shrink, grow and further
 * seal changes, so a mapping of it can never fault with SIGBUS. Mode 0600: a holder of a read-only
 * descriptor that is not its owner cannot reopen it writable through /proc/self/fd.
 */
export function memfdSealed(name: string, length: number): number {
  const fd = c_memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING) as number;
  if (fd < 0) throw new NativeError('memfd_create', lastErrno());
  try {
    if ((c_ftruncate(fd, length) as number) !== 0) throw new NativeError('ftruncate', lastErrno());
    if ((c_fchmod(fd, 0o600) as number) !== 0) throw new NativeError('fchmod', lastErrno());
    if ((c_fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) as number) !== 0) {
      throw new NativeError('fcntl(F_ADD_SEALS)', lastErrno());
    }
  } catch (err) {
    c_close(fd);
    throw err;
  }
  return fd;
}

const c_pipe2 = libc.func('int pipe2(_Out_ int *fds, int flags)');
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const F_SETPIPE_SZ = 1031;

/**
 * A non-blocking pipe for wake-ups, [read end, write end], its buffer cut to one page: a wake-up is
 * one byte and the bytes mean nothing, so a page is plenty, and it counts one page, not sixteen,
 * against the user's pipe limit (a hypervisor holds two pipes per event channel).
 */
export function wakePipe(): [number, number] {
  const fds = [0, 0];
  if ((c_pipe2(fds, O_NONBLOCK | O_CLOEXEC) as number) !== 0) throw new NativeError('pipe2', lastErrno());
  c_fcntl(fds[0]!, F_SETPIPE_SZ, PAGE_SIZE);
  return [fds[0]!, fds[1]!];
}

/** The seals of a memfd (F_SEAL_* bits). */
export function getSeals(fd: number): number {
  const r = c_fcntl(fd, F_GET_SEALS, 0) as number;
  if (r < 0) throw new NativeError('fcntl(F_GET_SEALS)', lastErrno());
  return r;
}

/** ftruncate(2), reporting errno instead of throwing Node's error (for tests of sealed memory). */
export function tryTruncate(fd: number, length: number): number {
  return (c_ftruncate(fd, length) as number) === 0 ? 0 : lastErrno();
}

/** mmap(2) of one page shared, reporting errno instead of throwing (0 on success, the page unmapped again). */
export function tryMapPage(fd: number, offset: number, writable: boolean): number {
  const ptr = c_mmap(null, PAGE_SIZE, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, offset);
  if (koffi.address(ptr) === 0xffffffffffffffffn) return lastErrno();
  c_munmap(ptr, PAGE_SIZE);
  return 0;
}

const c_close = libc.func('int close(int fd)');

/**
 * A reserved range of address space (PROT_NONE) into which whole pages of memory files are placed one
 * by one with MAP_FIXED: a domain's guest frames, each its own memfd, seen side by side.
 */
export class Region {
  readonly #base: unknown;
  readonly #addr: bigint;
  readonly length: number;
  #buffer: ArrayBuffer | null;

  constructor(length: number) {
    if (length <= 0 || length % PAGE_SIZE !== 0) throw new RangeError(`Region: length ${length} is not a positive page multiple`);
    const base = c_mmap(null, length, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (koffi.address(base) === 0xffffffffffffffffn) throw new NativeError('mmap', lastErrno());
    this.#base = base;
    this.#addr = koffi.address(base) as bigint;
    this.length = length;
    this.#buffer = koffi.view(base, length) as ArrayBuffer;
  }

  /** The whole range; touching a page nothing was placed at faults. */
  get buffer(): ArrayBuffer {
    if (!this.#buffer) throw new Error('region used after unmap');
    return this.#buffer;
  }

  /** Place page `offset` .. +PAGE_SIZE of `fd` (from its start) at byte `at` of the range. */
  place(at: number, fd: number, writable: boolean): void {
    if (!this.#buffer) throw new Error('region used after unmap');
    if (at % PAGE_SIZE !== 0 || at < 0 || at + PAGE_SIZE > this.length) throw new RangeError(`Region.place: offset ${at} out of range`);
    const prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    const got = c_mmap_at(this.#addr + BigInt(at), PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fd, 0);
    if (koffi.address(got) === 0xffffffffffffffffn) throw new NativeError('mmap', lastErrno());
  }

  unmap(): void {
    if (!this.#buffer) return;
    this.#buffer = null;
    if ((c_munmap(this.#base, this.length) as number) !== 0) throw new NativeError('munmap', lastErrno());
  }
}

const c_getrlimit = libc.func('int getrlimit(int resource, void *rlim)');
const c_setrlimit = libc.func('int setrlimit(int resource, void *rlim)');
const RLIMIT_NOFILE = 7;

/**
 * Raise this process's descriptor limit as far as it may go (soft to hard; a privileged process also
 * lifts the hard limit to `ceiling`). Returns the soft limit now in force.
 */
export function raiseFdLimit(ceiling: number): number {
  const buf = Buffer.alloc(16);
  if ((c_getrlimit(RLIMIT_NOFILE, buf) as number) !== 0) throw new NativeError('getrlimit', lastErrno());
  const hard = buf.readBigUInt64LE(8);
  const want = BigInt(ceiling) > hard ? BigInt(ceiling) : hard;
  buf.writeBigUInt64LE(want, 0);
  buf.writeBigUInt64LE(want, 8);
  if ((c_setrlimit(RLIMIT_NOFILE, buf) as number) !== 0) {
    buf.writeBigUInt64LE(hard, 0);
    buf.writeBigUInt64LE(hard, 8);
    if ((c_setrlimit(RLIMIT_NOFILE, buf) as number) !== 0) throw new NativeError('setrlimit', lastErrno());
  }
  if ((c_getrlimit(RLIMIT_NOFILE, buf) as number) !== 0) throw new NativeError('getrlimit', lastErrno());
  return Number(buf.readBigUInt64LE(0));
}
