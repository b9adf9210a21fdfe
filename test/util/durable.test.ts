// The durable helpers must fsync the file, then make the directory entry durable: checked in the
// syscalls a child process makes (strace), since a missing directory fsync is invisible otherwise.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

const mod = path.resolve('dist/src/util/durable.js');
let dir = '';
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

function traced(call: string): string[] {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'durable-'));
  const script = `import(${JSON.stringify(mod)}).then((m) => { m.${call}; })`;
  const log = path.join(dir, 'strace.log');
  execFileSync('strace', ['-f', '-qq', '-e', 'trace=openat,fsync,rename,renameat,renameat2', '-o', log, process.execPath, '-e', script], { env: { ...process.env, D: dir } });
  // Only the lines about our directory: node's own start-up opens are not part of the contract.
  return fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.includes(dir) || /fsync\(/.test(l));
}

function fdOf(lines: string[], re: RegExp): string {
  const l = lines.find((x) => re.test(x) && /openat/.test(x));
  expect(l, `an openat matching ${re}`).toBeDefined();
  return /= (\d+)$/.exec(l!)![1]!;
}

describe('durable file writes', () => {
  it('replaceDurableSync: fsync of the temporary file, rename, then fsync of the directory', () => {
    const lines = traced("replaceDurableSync(process.env.D + '/f.pem', Buffer.from('x'), 0o644)");
    const fileFd = fdOf(lines, /f\.pem\.tmp"/);
    const iFsyncFile = lines.findIndex((l) => l.includes(`fsync(${fileFd})`));
    const iRename = lines.findIndex((l) => /rename/.test(l) && l.includes('f.pem"'));
    const dirOpen = lines.findIndex((l, i) => i > iRename && /openat/.test(l) && l.includes('O_DIRECTORY'));
    expect(iFsyncFile).toBeGreaterThanOrEqual(0);
    expect(iRename).toBeGreaterThan(iFsyncFile);
    expect(dirOpen).toBeGreaterThan(iRename);
    const dirFd = /= (\d+)$/.exec(lines[dirOpen]!)![1]!;
    expect(lines.slice(dirOpen).some((l) => l.includes(`fsync(${dirFd})`))).toBe(true);
    expect(fs.readFileSync(path.join(dir, 'f.pem'), 'utf8')).toBe('x');
    expect(fs.statSync(path.join(dir, 'f.pem')).mode & 0o777).toBe(0o644);
  });

  it('createDurableSync: O_EXCL create, fsync, then fsync of the directory; an existing file is refused', () => {
    const lines = traced("createDurableSync(process.env.D + '/k', Buffer.from('k'))");
    const open = lines.find((l) => /openat/.test(l) && l.includes('/k"'));
    expect(open).toMatch(/O_EXCL/);
    const fd = fdOf(lines, /\/k"/);
    const iFsync = lines.findIndex((l) => l.includes(`fsync(${fd})`));
    const dirOpen = lines.findIndex((l, i) => i > iFsync && /openat/.test(l) && l.includes('O_DIRECTORY'));
    expect(iFsync).toBeGreaterThanOrEqual(0);
    expect(dirOpen).toBeGreaterThan(iFsync);
    expect(fs.statSync(path.join(dir, 'k')).mode & 0o777).toBe(0o600);
    expect(() => execFileSync(process.execPath, ['-e', `import(${JSON.stringify(mod)}).then((m) => m.createDurableSync(process.env.D + '/k', Buffer.from('z')))`], { env: { ...process.env, D: dir }, stdio: 'pipe' })).toThrow(/EEXIST/);
    expect(fs.readFileSync(path.join(dir, 'k'), 'utf8')).toBe('k');
  });
});
