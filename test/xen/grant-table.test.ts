// Grant tables: Xen's checks and statuses on map, the in-use bits, and what a mapping can see.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fork } from 'node:child_process';
import { freshXenDir, ROOT } from '../helpers/child.js';
import {
  Domain,
  GNTST,
  GrantError,
  GTF_permit_access,
  GTF_readonly,
  GTF_reading,
  GTF_writing,
  PAGE_SIZE,
} from '../../src/xen/index.js';
import { join } from 'node:path';
import { removeDir } from '../helpers/temp.js';

const dir = freshXenDir();
let guest: Domain;
let back: Domain;

beforeAll(async () => {
  guest = await Domain.create({ domid: 3, dir });
  back = await Domain.create({ domid: 0, dir });
});
afterAll(async () => {
  await guest.destroy();
  await back.destroy();
  removeDir(dir);
});

function status(f: () => unknown): number {
  try {
    f();
  } catch (err) {
    if (err instanceof GrantError) return err.status;
    throw err;
  }
  return GNTST.okay;
}

describe('grant table entries', () => {
  it('writes grant_entry_v1 bytes: flags u16, domid u16, frame u32, little-endian', () => {
    const gfn = guest.allocFrames();
    const ref = guest.grants.grantAccess(0x1234, gfn, true);
    const raw = Buffer.from(guest.views.grant16.buffer, guest.views.grant16.byteOffset + ref * 8, 8);
    const expected = Buffer.alloc(8);
    expected.writeUInt16LE(GTF_permit_access | GTF_readonly, 0); // 0x0005
    expected.writeUInt16LE(0x1234, 2);
    expected.writeUInt32LE(gfn, 4);
    expect(raw.toString('hex')).toBe(expected.toString('hex'));
    expect(raw.subarray(0, 4).toString('hex')).toBe('05003412');
    expect(guest.grants.endAccess(ref)).toBe(true);
    expect(guest.grants.flags(ref)).toBe(0);
  });

  it('never hands out the 8 reserved refs', () => {
    const gfn = guest.allocFrames();
    const ref = guest.grants.grantAccess(0, gfn);
    expect(ref).toBeGreaterThanOrEqual(8);
    guest.grants.endAccess(ref);
  });
});

describe('map_grant_ref checks', () => {
  it('maps exactly the granted page, and both sides see each other\'s writes', () => {
    const gfn = guest.allocFrames(3);
    const ref = guest.grants.grantAccess(0, gfn + 1);
    guest.frames(gfn + 1)[17] = 0xab;
    guest.frames(gfn)[0] = 0x11; // neighbours must not be visible through the mapping
    const m = back.mapper.map(3, ref);
    const view = new Uint8Array(m.buffer);
    expect(view.length).toBe(PAGE_SIZE);
    expect(view[17]).toBe(0xab);
    expect(view[0]).toBe(0);
    view[100] = 0xcd;
    expect(guest.frames(gfn + 1)[100]).toBe(0xcd);
    m.unmap();
    expect(guest.grants.endAccess(ref)).toBe(true);
  });

  it('sets GTF_reading|GTF_writing while mapped writable, and end_access fails until unmap', () => {
    const ref = guest.grants.grantAccess(0, guest.allocFrames());
    const m = back.mapper.map(3, ref);
    expect(guest.grants.flags(ref)).toBe(GTF_permit_access | GTF_reading | GTF_writing);
    expect(guest.grants.endAccess(ref)).toBe(false);
    m.unmap();
    expect(guest.grants.flags(ref)).toBe(GTF_permit_access);
    expect(guest.grants.endAccess(ref)).toBe(true);
  });

  it('sets only GTF_reading for a read-only mapping and keeps it until the last mapping goes', () => {
    const ref = guest.grants.grantAccess(0, guest.allocFrames(), true);
    const a = back.mapper.map(3, ref, { readonly: true });
    const b = back.mapper.map(3, ref, { readonly: true });
    expect(guest.grants.flags(ref)).toBe(GTF_permit_access | GTF_readonly | GTF_reading);
    a.unmap();
    expect(guest.grants.endAccess(ref)).toBe(false);
    b.unmap();
    expect(guest.grants.endAccess(ref)).toBe(true);
  });

  it('GNTST_general_error (-1) for a writable map of a read-only grant', () => {
    const ref = guest.grants.grantAccess(0, guest.allocFrames(), true);
    expect(status(() => back.mapper.map(3, ref))).toBe(GNTST.general_error);
    expect(guest.grants.flags(ref)).toBe(GTF_permit_access | GTF_readonly);
    guest.grants.endAccess(ref);
  });

  it('GNTST_general_error (-1) when the grant names another domain', () => {
    const ref = guest.grants.grantAccess(7, guest.allocFrames());
    expect(status(() => back.mapper.map(3, ref))).toBe(GNTST.general_error);
    guest.grants.endAccess(ref);
  });

  it('GNTST_general_error (-1) for a ref that is not permit_access (never granted or revoked)', () => {
    expect(status(() => back.mapper.map(3, 300))).toBe(GNTST.general_error);
  });

  it('GNTST_bad_gntref (-3) for a ref past the table', () => {
    expect(status(() => back.mapper.map(3, 512))).toBe(GNTST.bad_gntref);
    expect(status(() => back.mapper.map(3, -1))).toBe(GNTST.bad_gntref);
  });

  it('GNTST_bad_domain (-2) for an unknown domain', () => {
    expect(status(() => back.mapper.map(42, 8))).toBe(GNTST.bad_domain);
  });

  it('GNTST_bad_page (-9) when the grant names a frame the granter does not have, leaving no pin', () => {
    const ref = guest.grants.grantAccess(0, 0);
    // A guest is free to scribble on its own grant table; the mapper must not trust the frame.
    Atomics.store(guest.views.grant32, 2 * ref + 1, 1 << 30);
    expect(status(() => back.mapper.map(3, ref))).toBe(GNTST.bad_page);
    expect(guest.grants.flags(ref)).toBe(GTF_permit_access);
    guest.grants.endAccess(ref);
  });

  it('maps several refs into one contiguous view (multi-page ring), all or nothing', () => {
    const gfn = guest.allocFrames(2);
    const r0 = guest.grants.grantAccess(0, gfn);
    const r1 = guest.grants.grantAccess(0, gfn + 1);
    guest.frames(gfn)[4095] = 1;
    guest.frames(gfn + 1)[0] = 2;
    const m = back.mapper.mapMany(3, [r0, r1]);
    const v = new Uint8Array(m.buffer);
    expect([v.length, v[4095], v[4096]]).toEqual([8192, 1, 2]);
    m.unmap();
    // One bad ref: nothing stays pinned.
    expect(status(() => back.mapper.mapMany(3, [r0, 9999]))).toBe(GNTST.bad_gntref);
    expect(guest.grants.endAccess(r0)).toBe(true);
    expect(guest.grants.endAccess(r1)).toBe(true);
  });

  it('a read-only mapping is enforced by the MMU: a write through it kills the writer', async () => {
    const ref = guest.grants.grantAccess(11, guest.allocFrames(), true);
    const script = join(ROOT, 'test', 'helpers', 'write-readonly-grant.mjs');
    const child = fork(script, [dir, '3', String(ref)], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    const msgs: unknown[] = [];
    child.on('message', (m) => msgs.push(m));
    const [code, signal] = await new Promise<[number | null, string | null]>((r) => child.on('exit', (c, s) => r([c, s])));
    expect(msgs).toContainEqual({ kind: 'mapped', value: 0 });
    expect(signal === 'SIGSEGV' || signal === 'SIGBUS' || code === 139).toBe(true);
  });
});
