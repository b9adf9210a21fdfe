// Waiting busily for a socket's next message: the socket form of the shared-memory spin in
// src/xen/poll.ts. A process that sleeps in epoll between a reply and its peer's next request pays a
// wake-up (an idle vCPU's halt and IPI, then the event loop's return) that can cost more than the
// request itself; one that spins for a few tens of µs with poll(2) and a zero timeout is still on
// its CPU when the request lands, so its event loop then finds the socket ready without sleeping.
//
// Each probe asks about two descriptors at once: the socket, and the event loop's own epoll descriptor,
// which is readable whenever anything else the loop watches (another guest's socket, a thread-pool
// completion) is ready: the spin gives way to other work at once, as the kernel's busy-poll stops at
// need_resched(). Nothing is read here: the loop reads the socket as always, so order is untouched.
import './koffi-config.js';
import koffi from './koffi.js';

const libc = koffi.load('libc.so.6');
const c_poll = libc.func('int poll(void *fds, unsigned long nfds, int timeout)');
const c_malloc = libc.func('void *malloc(size_t size)');
const node = koffi.load(null);
const uv_default_loop = node.func('void *uv_default_loop(void)');
const uv_backend_fd = node.func('int uv_backend_fd(const void *loop)');

const POLLIN = 0x1;
const POLLERR = 0x8;
const POLLHUP = 0x10;
const POLLNVAL = 0x20;
/** Probes between two looks at the clock (a probe is one poll(2), ~1 µs). */
const PROBES_PER_CLOCK = 4;

/** Two struct pollfd (int fd; short events; short revents), allocated once for the process. */
let fds: { ptr: unknown; view: DataView } | null = null;
let loopFd = -1;

function pollfds(): { ptr: unknown; view: DataView } {
  if (fds) return fds;
  const ptr = c_malloc(16);
  if (!ptr) throw new Error('malloc failed');
  loopFd = uv_backend_fd(uv_default_loop()) as number;
  fds = { ptr, view: new DataView(koffi.view(ptr, 16) as ArrayBuffer) };
  return fds;
}

/** How a spin ended: the socket became readable (data, end or error), other work is ready, or time ran out. */
export type SpinEnd = 'readable' | 'other' | 'timeout';

/**
 * Spin for at most `budgetUs` until `fd` is readable or the event loop has something else to do.
 * Blocks the JS thread for the budget at most; reads nothing.
 */
export function spinReadable(fd: number, budgetUs: number): SpinEnd {
  const { ptr, view } = pollfds();
  view.setInt32(0, fd, true);
  view.setInt16(4, POLLIN, true);
  view.setInt32(8, loopFd, true);
  view.setInt16(12, POLLIN, true);
  const deadline = performance.now() + budgetUs / 1000;
  for (let i = 1; ; i++) {
    view.setInt16(6, 0, true);
    view.setInt16(14, 0, true);
    if ((c_poll(ptr, 2, 0) as number) > 0) {
      if (view.getInt16(6, true) & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) return 'readable';
      if (view.getInt16(14, true) !== 0) return 'other';
    }
    if (i % PROBES_PER_CLOCK === 0 && performance.now() >= deadline) return 'timeout';
  }
}
