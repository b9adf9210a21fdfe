// Real QEMU 7.2 (TCG) booting Debian's kernel with a busybox initramfs against our endpoint, tpm-tis
// and tpm-crb: the guest sees a TPM 2 with SeaBIOS's PCRs 0-7, a raw GetRandom and PCR_Extend succeed;
// then save/restore (stop, migrate to a file, a second QEMU with -incoming on a fresh endpoint for the
// same VM, cont): the extended PCR is unchanged and the guest keeps running. And the same across swtpm
// in both directions (unencrypted state blobs).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { Qemu, Swtpm, TestHost, buildInitramfs, expectedPcr16, guestReport } from './helpers.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qemu');
let host: TestHost;
let initrd: string;
const qemus: Qemu[] = [];
const swtpms: Swtpm[] = [];

beforeAll(async () => {
  [host, initrd] = await Promise.all([TestHost.up(work), buildInitramfs(work)]);
});

afterAll(async () => {
  await Promise.all(qemus.map((q) => q.quit()));
  await Promise.all(swtpms.map((s) => s.stop()));
  await host?.down();
  removeDir(work);
});

function startQemu(o: Omit<ConstructorParameters<typeof Qemu>[0], 'dir' | 'initrd'>): Qemu {
  const q = new Qemu({ ...o, dir: work, initrd });
  qemus.push(q);
  return q;
}

const SUCCESS_EXTEND = '80020000001300000000000000000000010000';

/** Boot until the guest printed its second loop line; check what the guest saw of its TPM. */
async function bootAndCheck(q: Qemu): Promise<void> {
  await q.waitSerial(/^E2E-LOOP 2 /m);
  const r = guestReport(q.serialText());
  expect(r.version).toBe('2');
  expect(r.pcrs).toHaveLength(8);
  for (const p of r.pcrs) {
    expect(p).toMatch(/^[0-9A-F]{64}$/);
    expect(p).not.toBe('0'.repeat(64));
  }
  // GetRandom(16): tag 8001, size 0x1c, rc 0, TPM2B size 0x10, 16 random bytes.
  expect(r.getrandom).toMatch(/^80010000001c000000000010[0-9a-f]{32}$/);
  expect(r.extend).toBe(SUCCESS_EXTEND);
  expect(r.loops[0]!.pcr16).toBe(expectedPcr16());
}

/** stop + migrate to a file on `src`, quit it; start `dst` with -incoming; cont; the guest goes on. */
async function saveRestore(src: Qemu, file: string, startDst: () => Promise<Qemu>): Promise<Qemu> {
  const before = guestReport(src.serialText()).loops;
  await src.saveTo(file);
  const lastN = guestReport(src.serialText()).loops.at(-1)!.n;
  expect(lastN).toBeGreaterThanOrEqual(before.at(-1)!.n);
  await src.quit();
  const dst = await startDst();
  await dst.waitMigration();
  await dst.hmp('cont');
  const m = await dst.waitSerial(new RegExp(`^E2E-LOOP ${lastN + 2} `, 'm'));
  expect(m).toBeTruthy();
  const after = guestReport(dst.serialText());
  // No second boot on the destination: only loop lines, continuing the source's counter.
  expect(after.version).toBe('');
  expect(after.loops[0]!.n).toBe(lastN + 1);
  for (const l of after.loops) expect(l.pcr16).toBe(expectedPcr16());
  return dst;
}

describe('QEMU -tpmdev emulator on our endpoint', () => {
  it('tpm-tis: boots, sees a TPM 2 with SeaBIOS PCRs, GetRandom and PCR_Extend work; save/restore onto a fresh endpoint keeps PCR16 and the guest running', async () => {
    const vm = randomUUID();
    const ctrlA = join(work, 'tis-a.sock');
    await host.attach(vm, ctrlA);
    const a = startQemu({ name: 'tis-a', ctrl: ctrlA, device: 'tpm-tis' });
    await bootAndCheck(a);
    const file = join(work, 'tis.vmstate');
    const b = await saveRestore(a, file, async () => {
      await host.detach(vm);
      const ctrlB = join(work, 'tis-b.sock');
      await host.attach(vm, ctrlB);
      return startQemu({ name: 'tis-b', ctrl: ctrlB, device: 'tpm-tis', incoming: `exec:cat ${file}` });
    });
    await b.quit();
    await host.detach(vm);
    const log = host.backendLog();
    // The destination took the state from QEMU's blobs, then INIT with DELETE_VOLATILE.
    expect(log).toMatch(/SET_STATEBLOB permanent \(\d+ bytes\)/);
    expect(log).toMatch(/SET_STATEBLOB volatile \(\d+ bytes\)[\s\S]*CMD_INIT flags 0x1/);
  });

  it('tpm-crb: boots and works the same; its state moves to swtpm 0.7.1 and the guest goes on there', async () => {
    const vm = randomUUID();
    const ctrlA = join(work, 'crb-a.sock');
    await host.attach(vm, ctrlA);
    const a = startQemu({ name: 'crb-a', ctrl: ctrlA, device: 'tpm-crb' });
    await bootAndCheck(a);
    const file = join(work, 'crb.vmstate');
    const b = await saveRestore(a, file, async () => {
      const dir = join(work, 'swtpm-dst');
      const sw = await Swtpm.start(dir, join(work, 'swtpm-dst.sock'));
      swtpms.push(sw);
      return startQemu({ name: 'crb-swtpm', ctrl: sw.ctrl, device: 'tpm-crb', incoming: `exec:cat ${file}` });
    });
    await b.quit();
    await host.detach(vm);
    expect(swtpms.at(-1)!.log()).toMatch(/Ctrl Cmd: length \d+\n 00 00 00 0D/);
  });

  it('system_reset: QEMU re-INITs the TPM, the guest boots again on reset PCRs (PCR16 holds one extend, not two)', async () => {
    const vm = randomUUID();
    const ctrl = join(work, 'reset.sock');
    await host.attach(vm, ctrl);
    const q = startQemu({ name: 'reset', ctrl, device: 'tpm-tis', reboot: true });
    await bootAndCheck(q);
    const firstBoot = guestReport(q.serialText());
    await q.hmp('system_reset');
    // The second boot prints its own report; wait for its second loop line.
    await q.waitSerial(/E2E-VERSION[\s\S]*E2E-VERSION[\s\S]*E2E-LOOP 2 /);
    const second = q.serialText().slice(q.serialText().lastIndexOf('E2E-VERSION'));
    const r = guestReport('\n' + second);
    expect(r.version).toBe('2');
    expect(r.pcrs).toEqual(firstBoot.pcrs);
    expect(r.extend).toBe(SUCCESS_EXTEND);
    expect(r.loops[0]!.n).toBe(1);
    expect(r.loops[0]!.pcr16).toBe(expectedPcr16());
    await q.quit();
    await host.detach(vm);
  });

  it('TPM 1.2 (tpm-tis): QEMU detects a 1.2 TPM, the guest sees version 1 and SeaBIOS PCRs 0-7', async () => {
    const vm = randomUUID();
    const ctrl = join(work, 'tpm12.sock');
    await host.attach(vm, ctrl, '1.2');
    const q = startQemu({ name: 'tpm12', ctrl, device: 'tpm-tis' });
    await q.waitSerial(/^E2E-PCR12 PCR-07:/m);
    const serial = q.serialText();
    expect(serial).toMatch(/E2E-VERSION 1\s/);
    const pcrs = [...serial.matchAll(/^E2E-PCR12 PCR-0([0-7]): ((?:[0-9A-F]{2} ?){20})/gm)];
    expect(pcrs.map((m) => m[1])).toEqual(['0', '1', '2', '3', '4', '5', '6', '7']);
    for (const m of pcrs) expect(m[2]!.replace(/ /g, '')).not.toBe('0'.repeat(40));
    await q.quit();
    await host.detach(vm);
  });

  it('swtpm 0.7.1 -> ours: a guest booted on swtpm is restored onto our endpoint with PCR16 intact', async () => {
    const dir = join(work, 'swtpm-src');
    const sw = await Swtpm.start(dir, join(work, 'swtpm-src.sock'));
    swtpms.push(sw);
    const a = startQemu({ name: 'swtpm-a', ctrl: sw.ctrl, device: 'tpm-tis' });
    await bootAndCheck(a);
    const vm = randomUUID();
    const file = join(work, 'swtpm.vmstate');
    const b = await saveRestore(a, file, async () => {
      const ctrl = join(work, 'from-swtpm.sock');
      await host.attach(vm, ctrl);
      return startQemu({ name: 'from-swtpm', ctrl, device: 'tpm-tis', incoming: `exec:cat ${file}` });
    });
    await b.quit();
    await host.detach(vm);
  });
});
