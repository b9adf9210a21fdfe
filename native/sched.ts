// Where the calling thread runs: sched_getcpu(3) (rseq or vDSO, no system call on Linux). A polling end
// of a ring publishes it in its event channel's page (src/xen/event-channel.ts, sharesCpu) so that its
// peer can tell when the two share a CPU, where a spin only holds off the end it waits for.
import './koffi-config.js';
import koffi from './koffi.js';

const libc = koffi.load('libc.so.6');
const c_sched_getcpu = libc.func('int sched_getcpu(void)');

/** The CPU the calling thread runs on now (it may move at any time), or -1 if the kernel cannot say. */
export function currentCpu(): number {
  return c_sched_getcpu() as number;
}
