// GrantTable.releasePinsOf: a grantee killed while it maps our pages leaves its pins (GTF_reading /
// GTF_writing and the active entry) behind, and Xen-style endAccess refuses to revoke them forever.
// The toolstack's part, once the process is gone: drop exactly that domain's pins, nobody else's.
import { afterAll, describe, expect, it } from 'vitest';
import { fork } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { Domain } from '../../src/xen/index.js';
import { GTF_reading, GTF_writing } from '../../src/xen/grant-table.js';
import { ROOT, freshXenDir } from '../helpers/child.js';

const dir = freshXenDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('releasePinsOf', () => {
  it('releases the pins of a killed grantee so its grants can be revoked, leaving other grantees alone', async () => {
    const dom0 = await Domain.create({ domid: 0, dir });
    const other = await Domain.create({ domid: 13, dir });
    try {
      const gfn = dom0.allocFrames(4);
      const refs = [0, 1, 2].map((i) => dom0.grants.grantAccess(12, gfn + i, i === 2));
      const otherRef = dom0.grants.grantAccess(13, gfn + 3);
      const otherMap = other.mapper.map(0, otherRef);
      const child = fork(join(ROOT, 'test/multivm/map-and-hang.mjs'), [dir, '0', ...refs.map(String)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      const exited = new Promise((r) => child.once('exit', r));
      await new Promise((resolve, reject) => {
        child.once('message', resolve);
        child.once('exit', () => reject(new Error('child exited before mapping')));
      });
      expect(dom0.grants.flags(refs[0]!) & (GTF_reading | GTF_writing)).toBe(GTF_reading | GTF_writing);
      expect(dom0.grants.flags(refs[2]!) & (GTF_reading | GTF_writing)).toBe(GTF_reading);
      child.kill('SIGKILL');
      await exited;
      // Dead, but its pins are still there: Xen does not revoke a mapped grant.
      for (const r of refs) expect(dom0.grants.endAccess(r)).toBe(false);
      expect(dom0.grants.releasePinsOf(12)).toBe(3);
      for (const r of refs) expect(dom0.grants.endAccess(r)).toBe(true);
      // Domain 13's live mapping is untouched and still pins its grant.
      expect(dom0.grants.releasePinsOf(12)).toBe(0);
      expect(dom0.grants.endAccess(otherRef)).toBe(false);
      otherMap.unmap();
      expect(dom0.grants.endAccess(otherRef)).toBe(true);
    } finally {
      await other.destroy();
      await dom0.destroy();
      fs.rmSync(join(dir, 'dom12.mem'), { force: true });
    }
  });
});
