// Debian's xenstore-utils (libxenstore: XENSTORED_PATH → connect to that UNIX socket; their writes
// run in a transaction, -watch uses a watch) against a `vtpm xenstored` process.
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import type { XsClient } from '../../src/xenstore/client.js';
import { daemonPerFile, type Daemon } from './helpers.js';

const run = promisify(execFile);
let d: Daemon;
let c: XsClient;

daemonPerFile((dd, cc) => ((d = dd), (c = cc)));

/** Run a xenstore-* tool against our daemon; resolves with stdout and the exit code. */
async function tool(name: string, args: string[], socket = d.socket): Promise<{ out: string; code: number; err: string }> {
  try {
    const r = await run(`/usr/bin/xenstore-${name}`, args, { env: { ...process.env, XENSTORED_PATH: socket }, timeout: 10_000 });
    return { out: r.stdout, code: 0, err: r.stderr };
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string; code?: number };
    return { out: err.stdout ?? '', code: typeof err.code === 'number' ? err.code : -1, err: err.stderr ?? '' };
  }
}

describe('Debian xenstore-utils against vtpm xenstored', () => {
  it('xenstore-write stores values our client reads, xenstore-read reads ours', async () => {
    expect((await tool('write', ['/deb/a', 'alpha', '/deb/b', 'beta'])).code).toBe(0);
    expect(await c.readString('/deb/a')).toBe('alpha');
    await c.write('/deb/c', 'gamma');
    expect((await tool('read', ['/deb/c', '/deb/b'])).out).toBe('gamma\nbeta\n');
  });

  it('xenstore-read of a missing key fails', async () => {
    const r = await tool('read', ['/deb/missing']);
    expect(r.code).not.toBe(0);
  });

  it('xenstore-list and xenstore-ls show the tree', async () => {
    expect((await tool('list', ['/deb'])).out).toBe('a\nb\nc\n');
    const ls = await tool('ls', ['/deb']);
    expect(ls.out).toBe('a = "alpha"\nb = "beta"\nc = "gamma"\n');
    const full = await tool('ls', ['-f', '/deb']);
    expect(full.out).toContain('/deb/a = "alpha"');
  });

  it('xenstore-list pages a directory too long for one reply (libxenstore falls back to DIRECTORY_PART)', async () => {
    const names = Array.from({ length: 300 }, (_, i) => `child-number-${String(i).padStart(4, '0')}`);
    await c.transaction(async (tx) => {
      for (const n of names) await c.write(`/deb-big/${n}`, '', tx);
    });
    expect((await tool('list', ['/deb-big'])).out).toBe(names.join('\n') + '\n');
  });

  it('xenstore-exists reports presence through its exit code', async () => {
    expect((await tool('exists', ['/deb/a'])).code).toBe(0);
    expect((await tool('exists', ['/deb/zzz'])).code).not.toBe(0);
  });

  it('xenstore-rm removes a subtree', async () => {
    await c.write('/deb/gone/x/y', '1');
    expect((await tool('rm', ['/deb/gone'])).code).toBe(0);
    expect(await c.exists('/deb/gone')).toBe(false);
  });

  it('xenstore-chmod sets permissions, recursively with -r, and ls -p shows them', async () => {
    await c.write('/deb/perm/child', 'v');
    expect((await tool('chmod', ['/deb/perm', 'n0', 'r5'])).code).toBe(0);
    expect(await c.getPerms('/deb/perm')).toEqual([
      { domid: 0, access: 'n' },
      { domid: 5, access: 'r' },
    ]);
    expect((await tool('chmod', ['-r', '/deb/perm', 'b7'])).code).toBe(0);
    expect(await c.getPerms('/deb/perm/child')).toEqual([{ domid: 7, access: 'b' }]);
    expect((await tool('ls', ['-p', '/deb/perm'])).out).toMatch(/child = "v".*\(b7\)/);
  });

  it('xenstore-watch -n prints the registration event and changes, then exits', async () => {
    const child = spawn('/usr/bin/xenstore-watch', ['-n', '3', '/deb/w'], { env: { ...process.env, XENSTORED_PATH: d.socket } });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    // wait for the registration event, then change things
    for (let i = 0; i < 200 && !out.includes('/deb/w'); i++) await new Promise((r) => setTimeout(r, 25));
    await c.write('/deb/w/one', '1');
    await c.rm('/deb/w');
    expect(await exited).toBe(0);
    expect(out.trim().split('\n')).toEqual(['/deb/w', '/deb/w/one', '/deb/w']);
  });

  it('work from a guest socket with relative paths, within the guest permissions', async () => {
    await c.introduce(4);
    const sock = d.domSocket(4);
    expect((await tool('write', ['mine', 'guest value'], sock)).code).toBe(0);
    expect(await c.readString('/local/domain/4/mine')).toBe('guest value');
    expect((await tool('read', ['mine'], sock)).out).toBe('guest value\n');
    await c.write('/deb/private', 'x');
    const denied = await tool('read', ['/deb/private'], sock);
    expect(denied.code).not.toBe(0);
    expect(denied.err).toMatch(/couldn't read path \/deb\/private/);
  });
});
