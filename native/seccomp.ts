// A seccomp filter for domain processes (docs/isolation.md): syscalls a guest or vTPM domain has no use
// for and that widen the kernel surface it can reach fail with EPERM: new namespaces (unshare, setns,
// clone with CLONE_NEW*), ptrace and cross-process memory, mounts, modules, keyrings, bpf, perf,
// userfaultfd, kexec. clone3 answers ENOSYS so libc falls back to clone, whose flags the filter can
// read. Installed with SECCOMP_FILTER_FLAG_TSYNC on every thread, inherited by children and kept across
// exec; needs no_new_privs (set by the launcher) or CAP_SYS_ADMIN.
import './koffi-config.js';
import koffi from './koffi.js';

const libc = koffi.load('libc.so.6');
const c_syscall = libc.func('long syscall(long number, ...)');
const c_errno = libc.func('int *__errno_location(void)');
const c_strerror = libc.func('const char *strerror(int errnum)');

const SYS_seccomp = 317;
const SECCOMP_SET_MODE_FILTER = 1;
const SECCOMP_FILTER_FLAG_TSYNC = 1;
const AUDIT_ARCH_X86_64 = 0xc000003e;
const SECCOMP_RET_ALLOW = 0x7fff0000;
const SECCOMP_RET_ERRNO = 0x00050000;
const EPERM = 1;
const ENOSYS = 38;
// BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_JMP|BPF_JSET|BPF_K, BPF_RET|BPF_K
const LD_ABS = 0x20;
const JEQ = 0x15;
const JGE = 0x35;
const JSET = 0x45;
const RET = 0x06;
// struct seccomp_data: nr @0, arch @4, instruction_pointer @8, args[6] @16 (u64 each, low word first).
const OFF_NR = 0;
const OFF_ARCH = 4;
const OFF_ARG0_LO = 16;

/** x86_64 numbers of the refused calls. */
const DENIED: Record<string, number> = {
  ptrace: 101,
  process_vm_readv: 310,
  process_vm_writev: 311,
  pidfd_getfd: 438,
  unshare: 272,
  setns: 308,
  mount: 165,
  umount2: 166,
  pivot_root: 155,
  chroot: 161,
  open_tree: 428,
  move_mount: 429,
  fsopen: 430,
  fsconfig: 431,
  fsmount: 432,
  fspick: 433,
  mount_setattr: 442,
  init_module: 175,
  finit_module: 313,
  delete_module: 176,
  kexec_load: 246,
  kexec_file_load: 320,
  add_key: 248,
  request_key: 249,
  keyctl: 250,
  bpf: 321,
  perf_event_open: 298,
  userfaultfd: 323,
  open_by_handle_at: 304,
  name_to_handle_at: 303,
  iopl: 172,
  ioperm: 173,
  swapon: 167,
  swapoff: 168,
  reboot: 169,
  acct: 163,
  quotactl: 179,
  personality: 135,
};
const SYS_clone = 56;
const SYS_clone3 = 435;
/** CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME */
const CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080;

export class SeccompError extends Error {
  readonly code = 'SECCOMP';
  constructor(message: string) {
    super(message);
    this.name = 'SeccompError';
  }
}

type Insn = [code: number, jt: number, jf: number, k: number];

function program(): Insn[] {
  const deny = Object.values(DENIED);
  // Layout: arch check, nr load, x32 check, clone3, clone (+ flag check), the deny list, allow, the returns.
  const p: Insn[] = [];
  const RET_ALLOW: Insn = [RET, 0, 0, SECCOMP_RET_ALLOW];
  const RET_EPERM: Insn = [RET, 0, 0, SECCOMP_RET_ERRNO | EPERM];
  const RET_ENOSYS: Insn = [RET, 0, 0, SECCOMP_RET_ERRNO | ENOSYS];
  const body: Insn[] = [];
  // Jumps are relative to the next instruction; their targets (the three returns at the end) are
  // patched in once the body length is known.
  const jumps: { at: number; field: 'jt' | 'jf'; target: 'allow' | 'eperm' | 'enosys' }[] = [];
  const push = (insn: Insn, jt?: 'allow' | 'eperm' | 'enosys', jf?: 'allow' | 'eperm' | 'enosys'): void => {
    if (jt) jumps.push({ at: body.length, field: 'jt', target: jt });
    if (jf) jumps.push({ at: body.length, field: 'jf', target: jf });
    body.push(insn);
  };
  push([LD_ABS, 0, 0, OFF_ARCH]);
  // Another ABI (i386 through int 0x80) would bypass the numbers below: refuse it all.
  push([JEQ, 0, 0, AUDIT_ARCH_X86_64], undefined, 'eperm');
  push([LD_ABS, 0, 0, OFF_NR]);
  push([JGE, 0, 0, 0x40000000], 'eperm'); // x32 ABI
  push([JEQ, 0, 0, SYS_clone3], 'enosys');
  push([JEQ, 0, 2, SYS_clone]); // not clone: skip the flag load and test
  push([LD_ABS, 0, 0, OFF_ARG0_LO]);
  // After loading clone's flags the accumulator no longer holds nr: decide here.
  push([JSET, 0, 0, CLONE_NEW_ANY], 'eperm', 'allow');
  for (const nr of deny) push([JEQ, 0, 0, nr], 'eperm');
  const ends = { allow: body.length, eperm: body.length + 1, enosys: body.length + 2 };
  body.push(RET_ALLOW, RET_EPERM, RET_ENOSYS);
  for (const j of jumps) {
    const off = ends[j.target] - j.at - 1;
    if (off > 255) throw new SeccompError('filter too long for 8-bit jumps');
    body[j.at]![j.field === 'jt' ? 1 : 2] = off;
  }
  p.push(...body);
  return p;
}

/** Install the filter on every thread of this process (x86_64 only; elsewhere it says so and does nothing). */
export function installDomainFilter(): boolean {
  if (process.arch !== 'x64') return false;
  const insns = program();
  const filter = Buffer.alloc(8 * insns.length);
  insns.forEach(([code, jt, jf, k], i) => {
    filter.writeUInt16LE(code, 8 * i);
    filter.writeUInt8(jt, 8 * i + 2);
    filter.writeUInt8(jf, 8 * i + 3);
    filter.writeUInt32LE(k >>> 0, 8 * i + 4);
  });
  // struct sock_fprog { unsigned short len; struct sock_filter *filter; }
  const fprog = Buffer.alloc(16);
  fprog.writeUInt16LE(insns.length, 0);
  fprog.writeBigUInt64LE(BigInt(koffi.address(filter)), 8);
  const rc = c_syscall(SYS_seccomp, 'int', SECCOMP_SET_MODE_FILTER, 'unsigned int', SECCOMP_FILTER_FLAG_TSYNC, 'void *', fprog) as number;
  if (rc !== 0) {
    const errno = koffi.decode(c_errno(), 'int') as number;
    throw new SeccompError(`seccomp(SET_MODE_FILTER, TSYNC) failed: ${c_strerror(errno) as string} (errno ${errno}, rc ${rc})`);
  }
  return true;
}
