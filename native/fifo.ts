// mkfifo(3), which Node does not offer: the manager's control channels are named pipes, as in Xen 3.x.
import './koffi-config.js';
import koffi from './koffi.js';

const libc = koffi.load('libc.so.6');
const c_mkfifo = libc.func('int mkfifo(const char *path, uint32_t mode)');
const c_errno = libc.func('int *__errno_location(void)');
const c_strerror = libc.func('const char *strerror(int errnum)');

export class FifoError extends Error {
  constructor(
    readonly path: string,
    readonly errno: number,
  ) {
    super(`mkfifo ${path} failed: ${c_strerror(errno) as string} (errno ${errno})`);
    this.name = 'FifoError';
  }
  get code(): string {
    return this.errno === 17 ? 'EEXIST' : `ERRNO_${this.errno}`;
  }
}

/** Creates a named pipe (mode is still masked by the umask, as with mkfifo(1)). */
export function mkfifo(path: string, mode = 0o600): void {
  if ((c_mkfifo(path, mode) as number) !== 0) throw new FifoError(path, koffi.decode(c_errno(), 'int') as number);
}
