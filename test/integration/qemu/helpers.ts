// Real QEMU, real swtpm and our host for the QEMU endpoint tests: a host made with `vtpm host up`,
// endpoints made with `vtpm qemu attach`, a busybox initramfs built here, QEMU under TCG with its HMP
// monitor on a UNIX socket, and swtpm as the peer.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT } from '../../helpers/child.js';
import { SwtpmProcess } from '../../helpers/swtpm.js';
import { TpmClient } from '../../helpers/tpm-client.js';

export const exec = promisify(execFile);
const cli = join(ROOT, 'dist/src/cli/main.js');
export const vtpm = (...args: string[]) =>
  exec(process.execPath, [cli, ...args], { env: { ...process.env, VTPM_NO_SETUP: '1', UV_THREADPOOL_SIZE: process.env['UV_THREADPOOL_SIZE'] ?? '16' } });

export class TestHost {
  readonly run: string;
  constructor(readonly work: string) {
    this.run = join(work, 'run');
  }
  static async up(work: string): Promise<TestHost> {
    const h = new TestHost(work);
    await vtpm('host', 'up', '--run', h.run, '--state', join(work, 'state'));
    return h;
  }
  async attach(vm: string, ctrl: string, version: '2.0' | '1.2' = '2.0'): Promise<void> {
    await vtpm('qemu', 'attach', '--run', this.run, '--vm', vm, '--ctrl', ctrl, '--tpm-version', version);
  }
  /** A local live migration's destination endpoint for `vm` (`qemu attach --incoming`). */
  async attachIncoming(vm: string, ctrl: string): Promise<string> {
    return (await vtpm('qemu', 'attach', '--run', this.run, '--vm', vm, '--ctrl', ctrl, '--incoming')).stdout;
  }
  async detachCtrl(ctrl: string): Promise<void> {
    await vtpm('qemu', 'detach', '--run', this.run, '--ctrl', ctrl);
  }
  async detach(vm: string): Promise<void> {
    await vtpm('qemu', 'detach', '--run', this.run, '--vm', vm);
  }
  async down(): Promise<void> {
    await vtpm('host', 'down', '--run', this.run).catch(() => {});
  }
  backendLog(): string {
    return fs.readFileSync(join(this.run, 'logs', 'backend.log'), 'utf8');
  }
}

export const KERNEL = fs.readdirSync('/boot').filter((f) => f.startsWith('vmlinuz-')).sort().map((f) => join('/boot', f)).pop() ?? '';

/** The PCR the guest extends, and the 32 bytes it extends it with. */
export const EXTEND_PCR = 16;
export const EXTEND_BYTE = 0xaa;
export const expectedPcr16 = (): string => pcr16After(1);
/** PCR16 after `n` extends with 32×0xAA from reset. */
export function pcr16After(n: number): string {
  let pcr = Buffer.alloc(32);
  for (let i = 0; i < n; i++) pcr = createHash('sha256').update(pcr).update(Buffer.alloc(32, EXTEND_BYTE)).digest();
  return pcr.toString('hex').toUpperCase();
}

// /init: report TPM version and PCRs 0-7 from sysfs, send a raw TPM2_GetRandom(16) and a raw
// TPM2_PCR_Extend(PCR16, sha256 = 32×0xAA) through /dev/tpm0 (one write, one read each), then print
// PCR16 once a second forever with a counter and the uptime, so a restored guest shows it kept running.
// With `e2e_extend_loop` on the kernel command line every loop extends PCR16 once more before it
// prints, so loop n shows PCR16 after n + 1 extends.
const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
T=/sys/class/tpm/tpm0
echo "E2E-VERSION $(cat $T/tpm_version_major)"
if [ "$(cat $T/tpm_version_major)" = 1 ]; then
  (cat $T/pcrs 2>/dev/null || cat $T/device/pcrs) | grep '^PCR-0[0-7]' | sed 's/^/E2E-PCR12 /'
  while true; do sleep 1; done
fi
for i in 0 1 2 3 4 5 6 7; do echo "E2E-PCR $i $(cat $T/pcr-sha256/$i)"; done
raw() { exec 3<>/dev/tpm0; printf "$1" >&3; dd bs=4096 count=1 <&3 2>/dev/null | hexdump -v -e '/1 "%02x"'; exec 3<&-; }
echo "E2E-GETRANDOM $(raw '\\x80\\x01\\x00\\x00\\x00\\x0c\\x00\\x00\\x01\\x7b\\x00\\x10')"
AA='\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa\\xaa'
echo "E2E-EXTEND $(raw "\\x80\\x02\\x00\\x00\\x00\\x41\\x00\\x00\\x01\\x82\\x00\\x00\\x00\\x10\\x00\\x00\\x00\\x09\\x40\\x00\\x00\\x09\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x0b$AA")"
# With e2e_ekcert: each TCG EK certificate index, NV_ReadPublic for its size, then NV_Read (empty
# password session) in pieces of at most 768 bytes, so that a certificate takes more than one read.
h16() { printf '\\\\x%02x\\\\x%02x' $(($1>>8)) $(($1&255)); }
rc() { echo "$1" | cut -c13-20; }
nvcert() { P=$(raw "\\x80\\x01\\x00\\x00\\x00\\x0e\\x00\\x00\\x01\\x69$1")
  [ "$(rc $P)" = 00000000 ] || { echo "rc-$(rc $P)"; return; }
  PL=$((0x$(echo $P | cut -c45-48))); S=$((0x$(echo $P | cut -c$((49+2*PL))-$((52+2*PL)))))
  D=; O=0
  while [ $O -lt $S ]; do N=$((S-O)); [ $N -gt 768 ] && N=768
    R=$(raw "\\x80\\x02\\x00\\x00\\x00\\x23\\x00\\x00\\x01\\x4e$1$1\\x00\\x00\\x00\\x09\\x40\\x00\\x00\\x09\\x00\\x00\\x00\\x00\\x00$(h16 $N)$(h16 $O)")
    [ "$(rc $R)" = 00000000 ] || { echo "rc-$(rc $R)"; return; }
    D=$D$(echo $R | cut -c33-$((32+2*N))); O=$((O+N)); done
  echo $D; }
if grep -q e2e_ekcert /proc/cmdline; then
  echo "E2E-EKCERT-RSA $(nvcert '\\x01\\xc0\\x00\\x02')"
  echo "E2E-EKCERT-ECC $(nvcert '\\x01\\xc0\\x00\\x0a')"
fi
n=0
XL=0; grep -q e2e_extend_loop /proc/cmdline && XL=1
while true; do n=$((n+1))
  [ $XL = 1 ] && raw "\\x80\\x02\\x00\\x00\\x00\\x41\\x00\\x00\\x01\\x82\\x00\\x00\\x00\\x10\\x00\\x00\\x00\\x09\\x40\\x00\\x00\\x09\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x0b$AA" >/dev/null
  echo "E2E-LOOP $n uptime=$(cut -d' ' -f1 /proc/uptime) PCR16=$(cat $T/pcr-sha256/16)"; sleep 1; done
`;

/** Builds initramfs.cpio.gz (busybox-static, /init, /dev/console) in `dir`; returns its path. */
export async function buildInitramfs(dir: string): Promise<string> {
  const root = join(dir, 'initramfs');
  for (const d of ['bin', 'dev', 'proc', 'sys']) fs.mkdirSync(join(root, d), { recursive: true });
  fs.copyFileSync('/usr/bin/busybox', join(root, 'bin/busybox'));
  fs.writeFileSync(join(root, 'init'), INIT, { mode: 0o755 });
  await exec('mknod', ['-m', '600', join(root, 'dev/console'), 'c', '5', '1']);
  const out = join(dir, 'initramfs.cpio.gz');
  await exec('sh', ['-c', `cd '${root}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '${out}'`]);
  return out;
}

export interface QemuOptions {
  name: string;
  dir: string;
  initrd: string;
  ctrl: string;
  device: 'tpm-tis' | 'tpm-crb';
  incoming?: string;
  /** Let a reset reboot the guest (no -no-reboot). */
  reboot?: boolean;
  /** Extra kernel command line (e.g. e2e_extend_loop). */
  append?: string;
}

export class Qemu {
  readonly serial: string;
  readonly monitor: string;
  readonly proc: ChildProcess;
  stderr = '';
  exited = false;

  constructor(o: QemuOptions) {
    this.serial = join(o.dir, `serial-${o.name}.log`);
    this.monitor = join(o.dir, `mon-${o.name}.sock`);
    const args = [
      '-machine', 'q35', '-accel', 'tcg', '-m', '256', '-smp', '1', '-nographic', ...(o.reboot ? [] : ['-no-reboot']),
      '-kernel', KERNEL, '-initrd', o.initrd, '-append', `console=ttyS0 panic=-1 quiet${o.append ? ` ${o.append}` : ''}`,
      '-chardev', `socket,id=chrtpm,path=${o.ctrl}`, '-tpmdev', 'emulator,id=tpm0,chardev=chrtpm',
      '-device', `${o.device},tpmdev=tpm0`,
      '-serial', `file:${this.serial}`, '-monitor', `unix:${this.monitor},server,nowait`, '-display', 'none',
    ];
    if (o.incoming) args.push('-incoming', o.incoming);
    this.proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.proc.on('exit', () => (this.exited = true));
  }

  /**
   * The console so far, whole lines only: the file is read while QEMU is still writing it, and a capture
   * such as (\S*) or a PCR's hex would otherwise take the first half of a line that is still arriving.
   */
  serialText(): string {
    const text = this.rawSerial();
    return text.slice(0, text.lastIndexOf('\n') + 1);
  }

  /** The console file as it stands, a line still being written included (for error messages). */
  rawSerial(): string {
    try {
      return fs.readFileSync(this.serial, 'utf8');
    } catch {
      return '';
    }
  }

  /** Waits until the serial log matches; returns the match. */
  async waitSerial(re: RegExp, timeoutMs = 90_000): Promise<RegExpMatchArray> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const m = this.serialText().match(re);
      if (m) return m;
      if (this.exited) throw new Error(`QEMU exited before ${re}: ${this.stderr}\n${this.rawSerial().slice(-2000)}`);
      if (Date.now() > end) throw new Error(`timeout waiting for ${re}; serial tail:\n${this.rawSerial().slice(-2000)}`);
      await sleep(100);
    }
  }

  /** One HMP command; resolves with its output (up to the next prompt). */
  async hmp(command: string, timeoutMs = 60_000): Promise<string> {
    for (let i = 0; !fs.existsSync(this.monitor); i++) {
      if (i > 200 || this.exited) throw new Error(`no monitor socket: ${this.stderr}`);
      await sleep(50);
    }
    return new Promise((resolve, reject) => {
      const s = net.connect(this.monitor);
      let buf = '';
      let sent = false;
      const t = setTimeout(() => {
        s.destroy();
        reject(new Error(`HMP ${command}: timeout; got ${buf}`));
      }, timeoutMs);
      s.on('data', (d) => {
        buf += d.toString();
        if (!sent && buf.includes('(qemu) ')) {
          sent = true;
          buf = '';
          s.write(`${command}\n`);
        } else if (sent && buf.includes('(qemu) ')) {
          clearTimeout(t);
          s.destroy();
          resolve(buf.replace(/\x1b\[[0-9;]*[A-Za-z]/g, ''));
        }
      });
      s.on('close', () => {
        clearTimeout(t);
        resolve(buf);
      });
      s.on('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  async waitMigration(timeoutMs = 90_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.hmp('info migrate');
      if (/Migration status: completed/.test(info)) return;
      if (/Migration status: failed/.test(info)) throw new Error(`migration failed: ${info}`);
      if (this.exited) throw new Error(`QEMU exited during migration: ${this.stderr}`);
      if (Date.now() > end) throw new Error(`migration not completed: ${info}`);
      await sleep(200);
    }
  }

  /** `stop` then migrate the VM state into `file` (exec:cat), as a save. */
  async saveTo(file: string): Promise<void> {
    await this.hmp('stop');
    await this.hmp(`migrate "exec:cat > ${file}"`);
    await this.waitMigration();
  }

  async quit(): Promise<void> {
    if (this.exited) return;
    const gone = new Promise((r) => this.proc.once('exit', r));
    await this.hmp('quit').catch(() => {});
    await Promise.race([gone, sleep(5000)]);
    if (!this.exited) this.proc.kill('SIGKILL');
  }
}

/** A plain swtpm for QEMU (the peer), with its control socket at `ctrl` and its log in `dir`. */
export class Swtpm {
  private constructor(
    readonly dir: string,
    readonly ctrl: string,
    readonly sw: SwtpmProcess,
  ) {}
  static async start(dir: string, ctrl: string): Promise<Swtpm> {
    const sw = await SwtpmProcess.start({ stateDir: join(dir, 'state'), transport: 'unix', ctrlPath: ctrl, logFile: join(dir, 'swtpm.log') });
    return new Swtpm(dir, ctrl, sw);
  }
  stop(): Promise<void> {
    return this.sw.stop();
  }
  log(): string {
    return fs.readFileSync(join(this.dir, 'swtpm.log'), 'utf8');
  }
}

/** Parse the guest's E2E-* lines. */
export function guestReport(serial: string): { version: string; pcrs: string[]; getrandom: string; extend: string; loops: Array<{ n: number; pcr16: string }> } {
  const pcrs: string[] = [];
  for (const m of serial.matchAll(/^E2E-PCR (\d) ([0-9A-F]+)/gm)) pcrs[Number(m[1])] = m[2]!;
  return {
    version: serial.match(/^E2E-VERSION (\S+)/m)?.[1] ?? '',
    pcrs,
    getrandom: serial.match(/^E2E-GETRANDOM ([0-9a-f]*)/m)?.[1] ?? '',
    extend: serial.match(/^E2E-EXTEND ([0-9a-f]*)/m)?.[1] ?? '',
    loops: [...serial.matchAll(/^E2E-LOOP (\d+) uptime=\S+ PCR16=([0-9A-F]+)/gm)].map((m) => ({ n: Number(m[1]), pcr16: m[2]! })),
  };
}

/** A raw control-channel client: write bytes (optionally with fds), read exact reply sizes. */
export class CtrlClient {
  readonly sock: net.Socket;
  #buf = Buffer.alloc(0);
  #waiters: Array<() => void> = [];
  closed = false;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('close', () => {
      this.closed = true;
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('error', () => {});
  }

  static connect(path: string): Promise<CtrlClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new CtrlClient(s)));
      s.once('error', reject);
    });
  }

  get fd(): number {
    return (this.sock as unknown as { _handle: { fd: number } })._handle.fd;
  }

  write(hex: string | Uint8Array): void {
    this.sock.write(typeof hex === 'string' ? Buffer.from(hex.replace(/\s+/g, ''), 'hex') : hex);
  }

  /** Exactly n bytes, or what arrived before the timeout / close (then shorter). */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const end = Date.now() + timeoutMs;
    while (this.#buf.length < n && !this.closed && Date.now() < end) {
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, end - Date.now()));
        this.#waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    const out = this.#buf.subarray(0, Math.min(n, this.#buf.length));
    this.#buf = this.#buf.subarray(out.length);
    return Buffer.from(out);
  }

  async cmd(hex: string, replyLen: number, timeoutMs?: number): Promise<string> {
    this.write(hex);
    return (await this.read(replyLen, timeoutMs)).toString('hex');
  }

  close(): void {
    this.sock.destroy();
  }
}

/** QEMU's end of the data channel (the fd passed with SET_DATAFD), spoken in hex. */
export class DataClient {
  readonly #c: TpmClient;
  constructor(fd: number) {
    this.#c = new TpmClient(new net.Socket({ fd, readable: true, writable: true }));
  }
  get sock(): net.Socket {
    return this.#c.sock;
  }
  /** Send one command; read one response (by its header size). */
  transmit(hex: string, timeoutMs = 10_000): Promise<string> {
    return this.#c.transmitHex(hex, timeoutMs);
  }
  close(): void {
    this.#c.close();
  }
}

export const TPM2 = {
  startupClear: '8001 0000000c 00000144 0000',
  // PCR_Read(sha256: PCR16)
  pcrRead16: '8001 00000014 0000017e 00000001 000b 03 000001',
  // PCR_Extend(PCR16, password session, sha256 = 32×0xAA)
  extend16: `8002 00000041 00000182 00000010 00000009 40000009 0000 01 0000 00000001 000b ${'aa'.repeat(32)}`,
};
