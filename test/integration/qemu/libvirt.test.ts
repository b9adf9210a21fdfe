// libvirt 9.0 (Debian 12) with `<tpm><backend type='external'>` on our endpoint: libvirtd defines and
// boots a TCG domain whose QEMU connects to the socket `vtpm qemu attach --owner libvirt-qemu` made,
// and the guest sees a TPM 2.0 with SeaBIOS's PCRs. The test starts libvirtd and virtlogd itself
// (and stops them) unless a libvirtd already answers on qemu:///system.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { KERNEL, TestHost, buildInitramfs, exec, expectedPcr16, guestReport, vtpm } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const URI = 'qemu:///system';
const work = tempDir('libvirt');
let host: TestHost;
const daemons: ChildProcess[] = [];
const virsh = (...a: string[]) => exec('virsh', ['-c', URI, ...a], { timeout: 60_000 });

/** The user libvirt runs QEMU as: qemu.conf's `user`, else Debian's default. */
function qemuUser(): string {
  const conf = fs.existsSync('/etc/libvirt/qemu.conf') ? fs.readFileSync('/etc/libvirt/qemu.conf', 'utf8') : '';
  return conf.match(/^\s*user\s*=\s*"([^"]+)"/m)?.[1] ?? 'libvirt-qemu';
}

async function libvirtUp(): Promise<void> {
  if (await virsh('version').then(() => true, () => false)) return;
  for (const d of ['virtlogd', 'libvirtd']) {
    const p = spawn(d, [], { stdio: ['ignore', 'ignore', 'pipe'] });
    p.stderr!.on('data', () => {});
    daemons.push(p);
  }
  for (let i = 0; ; i++) {
    if (await virsh('version').then(() => true, () => false)) return;
    if (i > 100 || daemons.some((d) => d.exitCode !== null)) throw new Error('libvirtd did not come up');
    await sleep(200);
  }
}

beforeAll(async () => {
  // libvirt's QEMU (another uid) must reach the kernel, the initramfs, the serial file and the socket.
  fs.chmodSync(work, 0o711);
  fs.copyFileSync(KERNEL, join(work, 'vmlinuz'));
  await Promise.all([
    libvirtUp(),
    TestHost.up(work).then((h) => (host = h)),
    buildInitramfs(work),
  ]);
});

afterAll(async () => {
  await host?.down();
  for (const d of daemons.reverse()) {
    if (d.exitCode !== null) continue;
    const gone = new Promise((r) => d.once('exit', r));
    d.kill('SIGTERM');
    await Promise.race([gone, sleep(10_000)]);
    if (d.exitCode === null) d.kill('SIGKILL');
  }
  removeDir(work);
});

describe('libvirt external TPM backend', () => {
  it("libvirtd offers backend type 'external'; a domain booted through it on our socket sees a TPM 2.0 with SeaBIOS PCRs", async () => {
    const caps = (await virsh('domcapabilities', '--virttype', 'qemu', '--arch', 'x86_64')).stdout;
    expect(caps).toMatch(/<tpm supported='yes'>[\s\S]*<value>external<\/value>[\s\S]*<\/tpm>/);

    const vm = randomUUID();
    const ctrl = join(work, 'tpm.sock');
    await vtpm('qemu', 'attach', '--run', host.run, '--vm', vm, '--ctrl', ctrl, '--owner', qemuUser());
    const st = fs.statSync(ctrl);
    expect(st.uid).toBe(Number((await exec('id', ['-u', qemuUser()])).stdout.trim()));
    expect(st.mode & 0o777).toBe(0o600);

    const name = `vtpm-test-${vm.slice(0, 8)}`;
    const serial = join(work, 'serial.log');
    const xml = join(work, 'domain.xml');
    fs.writeFileSync(
      xml,
      `<domain type='qemu'>
  <name>${name}</name>
  <uuid>${vm}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${join(work, 'vmlinuz')}</kernel>
    <initrd>${join(work, 'initramfs.cpio.gz')}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='${serial}'/><target port='0'/></serial>
    <tpm model='tpm-tis'>
      <backend type='external'><source type='unix' mode='connect' path='${ctrl}'/></backend>
    </tpm>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`,
    );
    await virsh('create', xml);
    try {
      expect((await virsh('dumpxml', name)).stdout).toMatch(/<backend type='external'>\s*<source type='unix' mode='connect' path='[^']+tpm\.sock'\/>/);
      const end = Date.now() + 120_000;
      while (!/^E2E-LOOP 1 /m.test(fs.existsSync(serial) ? fs.readFileSync(serial, 'utf8') : '')) {
        if (Date.now() > end) throw new Error(`guest did not report; serial:\n${fs.existsSync(serial) ? fs.readFileSync(serial, 'utf8') : ''}`);
        await sleep(200);
      }
      const r = guestReport(fs.readFileSync(serial, 'utf8'));
      expect(r.version).toBe('2');
      expect(r.pcrs).toHaveLength(8);
      for (const p of r.pcrs) expect(p).toMatch(/^(?!0{64})[0-9A-F]{64}$/);
      expect(r.getrandom).toMatch(/^80010000001c000000000010[0-9a-f]{32}$/);
      expect(r.loops[0]!.pcr16).toBe(expectedPcr16());
      expect(host.backendLog()).toMatch(/CMD_INIT flags 0x0/);
    } finally {
      await virsh('destroy', name).catch(() => {});
    }
    await host.detach(vm);
  });
});
