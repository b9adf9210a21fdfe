// The toolstack's control/shutdown write (`vtpm guest suspend`) against a real xenstored: one
// transaction in two round trips (the start, then the write, the permissions and the commit sent
// together), and the node the guest's watch then sees is finished: value and permissions.
import { describe, expect, it } from 'vitest';
import { XsType } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { writeControl } from '../../src/cli/suspend.js';
import { daemonPerFile } from '../xenstore/helpers.js';

let c: XsClient;

daemonPerFile((_d, cc) => (c = cc));

describe('writeControl', () => {
  it('writes control/shutdown and its permissions in one transaction of two round trips', async () => {
    await c.introduce(9);
    const seen: string[] = [];
    c.tap = (dir, packet) => seen.push(`${dir} ${XsType[packet.readUInt32LE(0)]}`);
    await writeControl(c, 9, 'suspend');
    c.tap = null;
    expect(seen).toEqual([
      'out TRANSACTION_START',
      'in TRANSACTION_START',
      'out WRITE',
      'out SET_PERMS',
      'out TRANSACTION_END',
      'in WRITE',
      'in SET_PERMS',
      'in TRANSACTION_END',
    ]);
    expect(await c.readString('/local/domain/9/control/shutdown')).toBe('suspend');
    expect(await c.getPerms('/local/domain/9/control/shutdown')).toEqual([{ domid: 9, access: 'n' }]);
  });
});
