// A grantee killed while it maps our pages: the hypervisor sees its connection close and drops exactly
// that domain's pins (GTF_reading / GTF_writing and the active entries), as Xen's gnttab_release_mappings,
// so endAccess can revoke them; other grantees' pins stay.
import { afterAll, describe, expect, it } from 'vitest';
import { fork } from 'node:child_process';
import { join } from 'node:path';
import { Domain } from '../../../src/xen/index.js';
import { GTF_reading, GTF_writing } from '../../../src/xen/grant-table.js';
import { ROOT, freshXenDir } from '../../helpers/child.js';
import { removeDir } from '../../helpers/temp.js';

const dir = freshXenDir();
afterAll(() => removeDir(dir));

describe('pins of a dead mapper', () => {
  it('releases the pins of a killed grantee so its grants can be revoked, leaving other grantees alone', async () => {
    const dom0 = await Domain.create({ domid: 0, dir });
    const other = await Domain.create({ domid: 13, dir });
    try {
      const gfn = dom0.allocFrames(4);
      const refs = [0, 1, 2].map((i) => dom0.grants.grantAccess(12, gfn + i, i === 2));
      const otherRef = dom0.grants.grantAccess(13, gfn + 3);
      const otherMap = other.mapper.map(0, otherRef);
      const child = fork(join(ROOT, 'test/integration/multivm/map-and-hang.mjs'), [dir, '0', ...refs.map(String)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      const exited = new Promise((r) => child.once('exit', r));
      await new Promise((resolve, reject) => {
        child.once('message', resolve);
        child.once('exit', () => reject(new Error('child exited before mapping')));
      });
      expect(dom0.grants.flags(refs[0]!) & (GTF_reading | GTF_writing)).toBe(GTF_reading | GTF_writing);
      expect(dom0.grants.flags(refs[2]!) & (GTF_reading | GTF_writing)).toBe(GTF_reading);
      child.kill('SIGKILL');
      await exited;
      // Dead: the hypervisor releases its pins without anyone asking.
      const left = new Set(refs);
      for (let i = 0; i < 200 && left.size; i++) {
        for (const r of [...left]) if (dom0.grants.endAccess(r)) left.delete(r);
        if (left.size) await new Promise((r) => setTimeout(r, 10));
      }
      expect([...left]).toEqual([]);
      // Domain 13's live mapping is untouched and still pins its grant.
      expect(dom0.grants.endAccess(otherRef)).toBe(false);
      otherMap.unmap();
      expect(dom0.grants.endAccess(otherRef)).toBe(true);
    } finally {
      await other.destroy();
      await dom0.destroy();
    }
  });
});
