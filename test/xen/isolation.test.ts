// The hypervisor boundary (docs/hypervisor.md), tried as a hostile guest would: it finds no other
// domain's memory to open, cannot resize its own (sealed) under a mapper, gets exactly the granted frame
// with exactly the granted access even when it mmaps the descriptor itself, and cannot reroute or mute
// anyone else's event channels.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { fork, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT, freshXenDir } from '../helpers/child.js';
import { Domain, GNTST, GTF_reading, GTF_writing, HC, createDomainConnection, domainExists } from '../../src/xen/index.js';
import { F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, getSeals, mapShared, tryMapPage, tryTruncate } from '../../native/libc.js';
import { closeFd } from '../../native/unix-rights.js';
import { V2Channel } from '../../src/backend/v2-channel.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import type { VtpmTarget } from '../../src/tpm/vtpm.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { removeDir } from '../helpers/temp.js';

const EPERM = 1;
const EACCES = 13;
const dir = freshXenDir();
let dom0: Domain;

const echo: VtpmTarget = {
  async execute(cmd: Uint8Array): Promise<Uint8Array> {
    const r = new Uint8Array(10);
    r.set([0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]);
    r[9] = cmd[9]!;
    return r;
  },
  cancel(): void {},
};

beforeAll(async () => {
  dom0 = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await dom0.destroy();
  removeDir(dir);
});

async function until(cond: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await sleep(5);
  }
}

describe('domain memory', () => {
  it('is no file a guest can open: the hypervisor directory holds only the toolstack socket and pid', async () => {
    const g = await Domain.create({ domid: 21, dir });
    try {
      expect(fs.readdirSync(dir).sort()).toEqual(['hypervisor.pid', 'hypervisor.sock']);
      expect(() => fs.openSync(`${dir}/dom0.mem`, 'r+')).toThrow(/ENOENT/);
      expect(fs.statSync(`${dir}/hypervisor.sock`).mode & 0o777).toBe(0o600);
    } finally {
      await g.destroy();
    }
  });

  it('is sealed: a guest cannot shrink or grow it, and the backend reading its page never faults', async () => {
    const g = await Domain.create({ domid: 22, dir });
    try {
      const front = new V2Front(g, 0);
      const fatal: string[] = [];
      const ch = new V2Channel(dom0, { frontDomid: g.domid, refs: [...front.refs], port: front.port, target: echo, onFatal: (r) => fatal.push(r) });
      // The guest asks for the descriptors of its own memory (frame 0 is the shared page) and truncates.
      const frame = g.hc.call(HC.populate, [0, 1]).fds[0]!;
      const control = g.hc.call(HC.domain_info).fds[0]!;
      try {
        for (const fd of [frame, control]) {
          expect(getSeals(fd) & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)).toBe(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
          expect(tryTruncate(fd, 0)).toBe(EPERM);
          expect(tryTruncate(fd, 1 << 30)).toBe(EPERM);
        }
        expect(fs.fstatSync(frame).size).toBe(4096);
      } finally {
        closeFd(frame);
        closeFd(control);
      }
      // The backend still reads and writes the page: a command after the attempts is answered.
      const rsp = await front.transmit(tpm2.getRandom(8));
      expect(Buffer.from(rsp).toString('hex')).toBe('80010000000a0000007b');
      expect(fatal).toEqual([]);
      ch.close();
      await front.close();
    } finally {
      await g.destroy();
    }
  });
});

describe('grant mapping', () => {
  it('hands a read-only grant over as a read-only descriptor: a mapper mmapping it PROT_WRITE gets EACCES', async () => {
    const g = await Domain.create({ domid: 23, dir });
    const mapper = await Domain.create({ domid: 24, dir });
    try {
      const gfn = g.allocFrames(2);
      g.frames(gfn + 1).fill(0x5a);
      const ro = g.grants.grantAccess(24, gfn, true);
      // A mapper that skips the library: the raw hypercall, then its own mmap.
      const rep = mapper.hc.tryCall(HC.map_grant, [23, ro, 0]);
      expect(rep.status).toBe(GNTST.general_error);
      expect(rep.fds).toEqual([]);
      const got = mapper.hc.call(HC.map_grant, [23, ro, 1]);
      const fd = got.fds[0]!;
      try {
        expect(tryMapPage(fd, 0, true)).toBe(EACCES);
        expect(tryMapPage(fd, 0, false)).toBe(0);
        expect(() => fs.writeSync(fd, Buffer.from([1]), 0, 1, 0)).toThrow(/EBADF/);
        // Exactly one frame: the guest's other frame (0x5a) is nowhere in this descriptor.
        expect(fs.fstatSync(fd).size).toBe(4096);
        const m = mapShared(fd, 0, 4096, false);
        expect(new Uint8Array(m.buffer).every((b) => b === 0)).toBe(true);
        m.unmap();
        // Reopening it writable through /proc needs the hypervisor's uid: a process of another uid
        // (as guests run with per-domain uids) is refused.
        const r = spawnSync(process.execPath, ['-e', "require('fs').openSync('/proc/self/fd/3', 'r+')"], {
          stdio: ['ignore', 'ignore', 'pipe', fd],
          uid: 65534,
          gid: 65534,
        });
        expect(r.stderr.toString()).toMatch(/EACCES/);
      } finally {
        closeFd(fd);
      }
      expect(mapper.hc.tryCall(HC.unmap_grant, [got.r[0]! + 1]).status).toBe(GNTST.bad_handle);
      expect(mapper.hc.call(HC.unmap_grant, [got.r[0]!]).status).toBe(0);
      expect(g.grants.endAccess(ro)).toBe(true);
      // A ref never granted, and a frame never granted to this mapper, hand out nothing.
      const ungranted = mapper.hc.tryCall(HC.map_grant, [23, 400, 1]);
      expect([ungranted.status, ungranted.fds.length]).toEqual([GNTST.general_error, 0]);
      const forOther = g.grants.grantAccess(25, gfn + 1);
      const stolen = mapper.hc.tryCall(HC.map_grant, [23, forOther, 1]);
      expect([stolen.status, stolen.fds.length]).toEqual([GNTST.general_error, 0]);
    } finally {
      await mapper.destroy();
      await g.destroy();
    }
  });
});

describe('a guest under its own uid', () => {
  it("works with only the connection the toolstack handed it, and reaches nothing of dom0's", async () => {
    const fd = await createDomainConnection({ domid: 51, dir });
    const child = fork(join(ROOT, 'test/helpers/guest-own-uid.mjs'), [dir, '51'], {
      uid: 65534,
      gid: 65534,
      stdio: ['ignore', 'inherit', 'inherit', 'ipc', fd],
      env: { ...process.env, VTPM_HV_FD: '4' },
    });
    closeFd(fd);
    const msgs: Array<Record<string, unknown>> = [];
    child.on('message', (m: Record<string, unknown>) => msgs.push(m));
    try {
      await until(() => msgs.some((m) => m.kind === 'ready'), 10_000);
      const ready = msgs.find((m) => m.kind === 'ready') as { ref: number; port: number; tried: Record<string, string> };
      // The toolstack socket and the hypervisor directory are dom0's.
      expect(ready.tried).toEqual({ connectToolstack: 'errno 13', listDir: 'EACCES' });
      const m = dom0.mapper.map(51, ready.ref, { readonly: true });
      expect(Buffer.from(new Uint8Array(m.buffer).subarray(0, 16)).toString()).toBe('hello from dom51');
      const local = dom0.evtchn.bindInterdomain(51, ready.port);
      dom0.evtchn.send(local);
      await until(() => msgs.some((x) => x.kind === 'event'));
      m.unmap();
      dom0.evtchn.close(local);
    } finally {
      child.send({ kind: 'exit' });
      await new Promise((r) => child.once('exit', r));
    }
    for (let i = 0; i < 100 && (await domainExists(dir, 51)); i++) await sleep(10);
    expect(await domainExists(dir, 51)).toBe(false);
  });
});

describe('a mapping kept past its grant', () => {
  it("holds the old page: the granter's next use of the frame is out of its reach", async () => {
    const g = await Domain.create({ domid: 43, dir });
    const mapper = await Domain.create({ domid: 44, dir });
    try {
      const gfn = g.allocFrames(1);
      const ref = g.grants.grantAccess(44, gfn);
      const got = mapper.hc.call(HC.map_grant, [43, ref, 0]);
      // A mapper that does not cooperate: maps the descriptor itself and keeps the mapping after unmap.
      const kept = mapShared(got.fds[0]!, 0, 4096, true);
      closeFd(got.fds[0]!);
      mapper.hc.call(HC.unmap_grant, [got.r[0]!]);
      expect(g.grants.endAccess(ref)).toBe(true);
      g.freeFrames(gfn);
      const again = g.allocFrames(1);
      expect(again).toBe(gfn);
      g.frames(again).set(Buffer.from('secret of dom43'));
      const view = new Uint8Array(kept.buffer);
      expect(view.subarray(0, 15).every((b) => b === 0)).toBe(true);
      view.set(Buffer.from('scribble'));
      expect(Buffer.from(g.frames(again).subarray(0, 15)).toString()).toBe('secret of dom43');
      kept.unmap();
    } finally {
      await mapper.destroy();
      await g.destroy();
    }
  });
});

describe('grant mapping across incarnations', () => {
  it("unmapping a dead granter's grant leaves the grants of a new domain with its domid alone", async () => {
    const mapper = await Domain.create({ domid: 42, dir });
    try {
      const g1 = await Domain.create({ domid: 41, dir });
      const ref1 = g1.grants.grantAccess(42, g1.allocFrames(1));
      const old = mapper.mapper.map(41, ref1);
      await g1.destroy();
      const g2 = await Domain.create({ domid: 41, dir });
      const ref2 = g2.grants.grantAccess(42, g2.allocFrames(1));
      expect(ref2).toBe(ref1);
      const cur = mapper.mapper.map(41, ref2);
      old.unmap();
      // g2's grant is still mapped: its in-use bits stay and it cannot be revoked yet.
      expect(g2.grants.flags(ref2) & (GTF_reading | GTF_writing)).toBe(GTF_reading | GTF_writing);
      expect(g2.grants.endAccess(ref2)).toBe(false);
      cur.unmap();
      expect(g2.grants.endAccess(ref2)).toBe(true);
      await g2.destroy();
    } finally {
      await mapper.destroy();
    }
  });
});

describe('event channels', () => {
  it("a guest cannot reroute, mute or close another guest's channel to dom0", async () => {
    const bad = await Domain.create({ domid: 26, dir });
    const good = await Domain.create({ domid: 27, dir });
    try {
      const goodPort = good.evtchn.allocUnbound(0);
      const goodLocal = dom0.evtchn.bindInterdomain(27, goodPort);
      const badPort = bad.evtchn.allocUnbound(0);
      const badLocal = dom0.evtchn.bindInterdomain(26, badPort);
      let got = 0;
      dom0.evtchn.on(goodLocal, () => got++);
      dom0.evtchn.on(badLocal, () => {});
      await until(() => got === 1); // the bind's initial pending
      // The hostile guest: bind to good's port (allocated for dom0), close every port number it can
      // name (its table is its own), and scribble over the one channel page it holds.
      expect(() => bad.evtchn.bindInterdomain(27, goodPort)).toThrow(/EINVAL/);
      for (let p = 1; p < 16; p++) {
        if (p !== badPort) expect(bad.hc.tryCall(HC.evtchn_close, [p]).status).toBeLessThan(0);
      }
      expect(bad.hc.tryCall(HC.evtchn_bind_interdomain, [0, goodLocal]).status).toBeLessThan(0);
      bad.evtchn.send(badPort);
      // good's channel to dom0 is exactly as it was.
      expect(dom0.evtchn.status(goodLocal)).toMatchObject({ state: 2, remoteDom: 27, remotePort: goodPort });
      for (let i = 0; i < 20; i++) {
        good.evtchn.send(goodPort);
        await until(() => got === i + 2);
      }
      dom0.evtchn.close(goodLocal);
      dom0.evtchn.close(badLocal);
    } finally {
      await bad.destroy();
      await good.destroy();
    }
  });
});
