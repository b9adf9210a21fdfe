// Identity comes from the socket: dom0's main socket, DIR/dom<N>.sock for introduced domains.
// Permissions are enforced for guests; relative paths hang off /local/domain/<domid>.
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { XsType, encodeMessage, encodeStrings } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { domainSocketPath } from '../../src/xenstore/client.js';
import { RawConn, connectClient, errnoOf, startDaemon, type Daemon } from './helpers.js';

let d: Daemon;
let dom0: XsClient;
let g5: XsClient;
let g6: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  dom0 = await connectClient(d.socket);
  await dom0.introduce(5, 1234, 7);
  await dom0.introduce(6);
  g5 = await connectClient(d.domSocket(5));
  g6 = await connectClient(d.domSocket(6));
});
afterAll(async () => {
  for (const c of [g5, g6, dom0]) await c?.close();
  await d?.stop();
});

describe('domain identity and permissions', () => {
  it('INTRODUCE creates dom<N>.sock and the domain home owned by the domain', async () => {
    expect(d.domSocket(5)).toBe(domainSocketPath(d.domDir, 5));
    expect(fs.statSync(d.domSocket(5)).isSocket()).toBe(true);
    expect(fs.statSync(d.domSocket(5)).mode & 0o777).toBe(0o600);
    expect(await dom0.isDomainIntroduced(5)).toBe(true);
    expect(await dom0.getPerms('/local/domain/5')).toEqual([{ domid: 5, access: 'n' }]);
  });

  it('resolves a guest relative path under its own home, whatever the payload says', async () => {
    await g5.write('data/x', 'five');
    expect(await dom0.readString('/local/domain/5/data/x')).toBe('five');
    // the same relative path from another guest lands in that guest's home
    await g6.write('data/x', 'six');
    expect(await dom0.readString('/local/domain/6/data/x')).toBe('six');
    expect(await g5.readString('data/x')).toBe('five');
  });

  it('makes a guest the owner of what it creates and hides other guests’ nodes', async () => {
    expect(await dom0.getPerms('/local/domain/5/data/x')).toEqual([{ domid: 5, access: 'n' }]);
    expect(await errnoOf(g6.read('/local/domain/5/data/x'))).toBe('EACCES');
    expect(await errnoOf(g6.write('/local/domain/5/data/x', 'evil'))).toBe('EACCES');
    expect(await errnoOf(g6.rm('/local/domain/5/data'))).toBe('EACCES');
    expect(await errnoOf(g6.directory('/local/domain/5'))).toBe('EACCES');
    // a missing node under an unreadable parent does not reveal whether it exists
    expect(await errnoOf(g6.read('/local/domain/5/data/nope'))).toBe('EACCES');
    expect(await errnoOf(g6.rm('/local/domain/5/data/nope'))).toBe('EACCES');
    expect(await errnoOf(g6.mkdir('/local/domain/5/data'))).toBe('EACCES');
    expect(await g5.readString('/local/domain/5/data/x')).toBe('five');
  });

  it('denies guests nodes dom0 owns with the default n0', async () => {
    await dom0.write('/tool/secret', 's');
    expect(await errnoOf(g5.read('/tool/secret'))).toBe('EACCES');
    expect(await errnoOf(g5.write('/tool/other', 'x'))).toBe('EACCES');
    expect(await errnoOf(g5.mkdir('/tool/dir'))).toBe('EACCES');
  });

  it('grants read, write and both per domain; the first entry is owner and default', async () => {
    await dom0.write('/acl/r', 'r');
    await dom0.setPerms('/acl/r', [{ domid: 0, access: 'n' }, { domid: 5, access: 'r' }]);
    expect(await g5.readString('/acl/r')).toBe('r');
    expect(await errnoOf(g5.write('/acl/r', 'x'))).toBe('EACCES');
    expect(await errnoOf(g6.read('/acl/r'))).toBe('EACCES');

    await dom0.write('/acl/w', 'w');
    await dom0.setPerms('/acl/w', [{ domid: 0, access: 'n' }, { domid: 5, access: 'w' }]);
    await g5.write('/acl/w', 'written');
    expect(await errnoOf(g5.read('/acl/w'))).toBe('EACCES');

    await dom0.write('/acl/default', 'd');
    await dom0.setPerms('/acl/default', [{ domid: 0, access: 'r' }]);
    expect(await g6.readString('/acl/default')).toBe('d');

    await dom0.write('/acl/owned', 'o');
    await dom0.setPerms('/acl/owned', [{ domid: 6, access: 'n' }]);
    await g6.write('/acl/owned', 'mine');
    expect(await g6.readString('/acl/owned')).toBe('mine');
  });

  it('lets only the owner change perms and only dom0 change the owner', async () => {
    await g5.write('own/k', 'v');
    await g5.setPerms('own/k', [{ domid: 5, access: 'n' }, { domid: 6, access: 'r' }]);
    expect(await g6.readString('/local/domain/5/own/k')).toBe('v');
    expect(await errnoOf(g6.setPerms('/local/domain/5/own/k', [{ domid: 6, access: 'b' }]))).toBe('EACCES');
    expect(await errnoOf(g5.setPerms('own/k', [{ domid: 6, access: 'b' }]))).toBe('EPERM');
    await dom0.setPerms('/local/domain/5/own/k', [{ domid: 6, access: 'n' }]);
    expect(await errnoOf(g5.read('own/k'))).toBe('EACCES');
  });

  it('refuses INTRODUCE, RELEASE and IS_DOMAIN_INTRODUCED from guests', async () => {
    expect(await errnoOf(g5.introduce(9))).toBe('EACCES');
    expect(await errnoOf(g5.release(6))).toBe('EACCES');
    expect(await errnoOf(g5.isDomainIntroduced(6))).toBe('EACCES');
    expect(fs.existsSync(d.domSocket(9))).toBe(false);
  });

  it('validates INTRODUCE arguments', async () => {
    expect(await errnoOf(dom0.introduce(0))).toBe('EINVAL');
    expect(await errnoOf(dom0.request(XsType.INTRODUCE, encodeStrings('abc', '1', '2')))).toBe('EINVAL');
    expect(await errnoOf(dom0.request(XsType.INTRODUCE, encodeStrings('9', '1')))).toBe('EINVAL');
    expect(await errnoOf(dom0.introduce(0x7ff0))).toBe('EINVAL');
    expect(await errnoOf(dom0.release(42))).toBe('ENOENT');
  });

  it('fires @introduceDomain and @releaseDomain for dom0, and RELEASE closes the domain socket and its connections', async () => {
    const events: string[] = [];
    await dom0.watch('@introduceDomain', (ev) => events.push(ev.path));
    await dom0.watch('@releaseDomain', (ev) => events.push(ev.path));
    await dom0.introduce(7);
    const g7 = await connectClient(d.domSocket(7));
    await g7.write('k', 'v');
    const raw7 = await RawConn.connect(d.domSocket(7));
    const g7closed = new Promise<Error>((r) => g7.onClose(r));
    await dom0.release(7);
    await raw7.waitClosed();
    expect((await g7closed).message).toMatch(/closed/);
    expect(fs.existsSync(d.domSocket(7))).toBe(false);
    expect(await errnoOf(g7.read('k'))).not.toBe('no error');
    // nodes the released domain owned went with it
    expect(await dom0.exists('/local/domain/7')).toBe(false);
    await new Promise((r) => setTimeout(r, 50));
    expect(events).toEqual(['@introduceDomain', '@releaseDomain', '@introduceDomain', '@releaseDomain']);
    // other guests are unaffected
    expect(await g5.readString('data/x')).toBe('five');
  });

  it('gives a guest the domid of its socket even if it sends frames meant for others', async () => {
    const raw = await RawConn.connect(d.domSocket(6));
    // a tx_id it never opened, and an absolute path in dom5's home
    raw.send(encodeMessage(XsType.READ, 1, 77, encodeStrings('/local/domain/5/data/x')));
    raw.send(encodeMessage(XsType.READ, 2, 0, encodeStrings('/local/domain/5/data/x')));
    const [a, b] = await raw.waitMessages(2);
    expect(a!.type).toBe(XsType.ERROR);
    expect(a!.payload.toString()).toBe('ENOENT\0');
    expect(b!.payload.toString()).toBe('EACCES\0');
    raw.close();
  });
});
