// Set-up belongs to `npm run setup`/`npm start`/`npm test`: a built `scripts/vtpm` starts without
// package checks or a build (issue 24 item 2), rebuilds only when a source is newer than the build,
// and installing the npm packages as locked leaves a fresh clone's tracked files untouched (item 5).
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from '../helpers/child.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const run = promisify(execFile);
const work = tempDir('setup');

afterAll(() => removeDir(work));

/** A PATH whose dpkg-query, apt-get, npm and npx only record that they were called. */
function spyPath(): { path: string; calls: () => string } {
  const bin = join(work, 'spy-bin');
  const log = join(work, 'spy.log');
  fs.mkdirSync(bin, { recursive: true });
  for (const name of ['dpkg-query', 'apt-get', 'npm', 'npx']) {
    fs.writeFileSync(join(bin, name), `#!/bin/sh\necho ${name} "$@" >> ${log}\nexit 1\n`, { mode: 0o755 });
  }
  return { path: `${bin}:${process.env.PATH ?? ''}`, calls: () => (fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '') };
}

/** A copy of the sources sharing this checkout's node_modules, so its dist/ is its own. */
function copyTree(): string {
  const dir = join(work, 'tree');
  for (const d of ['src', 'native', 'scripts']) fs.cpSync(join(ROOT, d), join(dir, d), { recursive: true });
  for (const f of ['package.json', 'tsconfig.json']) fs.copyFileSync(join(ROOT, f), join(dir, f));
  fs.symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  return dir;
}

const mtime = (f: string): number => fs.statSync(f).mtimeMs;

describe('scripts/vtpm start-up', () => {
  it('runs a built CLI without package checks, npm or a build', async () => {
    const spy = spyPath();
    // Built by the test set-up; the stamp says when (the global set-up builds with tsc directly).
    fs.writeFileSync(join(ROOT, 'dist/.vtpm-build'), '');
    const t0 = Date.now();
    const { stdout } = await run('bash', [join(ROOT, 'scripts/vtpm'), '--help'], { env: { ...process.env, PATH: spy.path, VTPM_NO_SETUP: '' } });
    const ms = Date.now() - t0;
    expect(stdout).toMatch(/Usage: vtpm/);
    expect(spy.calls()).toBe('');
    // Generous against a loaded machine: the old script ran eleven dpkg queries and tsc (~6 s).
    expect(ms).toBeLessThan(3000);
  });

  it('builds when dist is missing, not again while nothing changed, and again after a source changes', async () => {
    const dir = copyTree();
    const spy = spyPath();
    const env = { ...process.env, PATH: spy.path, VTPM_NO_SETUP: '' };
    const vtpm = () => run('bash', [join(dir, 'scripts/vtpm'), '--help'], { env });
    const stamp = join(dir, 'dist/.vtpm-build');
    expect((await vtpm()).stdout).toMatch(/Usage: vtpm/);
    const built = mtime(stamp);
    expect(fs.existsSync(join(dir, 'dist/src/cli/main.js'))).toBe(true);
    await vtpm();
    expect(mtime(stamp)).toBe(built);
    const later = new Date(Date.now() + 2000);
    fs.utimesSync(join(dir, 'src/cli/host.ts'), later, later);
    await vtpm();
    expect(mtime(stamp)).toBeGreaterThan(built);
    expect(spy.calls()).toBe('');
  }, 300_000);
});

describe('npm packages as locked', () => {
  it('leave a fresh clone of the committed tree clean (the lock file is the one npm wants)', async () => {
    const clone = join(work, 'clone');
    await run('git', ['clone', '-q', ROOT, clone]);
    // What set-up's install resolves (from npm's cache when it can): npm rewrites the lock if it
    // differs from what it would write.
    await run('npm', ['install', '--package-lock-only', '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: clone });
    const { stdout } = await run('git', ['status', '--porcelain'], { cwd: clone });
    expect(stdout).toBe('');
    // And set-up installs with `npm ci`, which refuses to rewrite it.
    expect(fs.readFileSync(join(clone, 'scripts/setup.sh'), 'utf8')).toMatch(/^\s*npm ci /m);
  }, 60_000);
});
