// The package as a library (issue 24 item 14): `import … from 'vtpm-split'` resolves through the
// package's exports (types and code), and docs/cli.md's TypeScript example compiles under strict
// NodeNext and runs as printed, against a real host it starts.
import { afterAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../helpers/child.js';
import { DAEMON_ROLES } from '../../src/cli/restart.js';
import { exec } from './cli.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const work = tempDir('cli-lib');
afterAll(() => removeDir(work));

/** The first ```ts block of docs/cli.md's library section, as printed. */
function example(): string {
  const doc = fs.readFileSync(join(ROOT, 'docs/cli.md'), 'utf8');
  const section = doc.slice(doc.indexOf('## The library'));
  const m = /```ts\n([^]*?)```/.exec(section);
  if (!m) throw new Error('docs/cli.md has no ```ts block under "## The library"');
  return m[1]!;
}

describe('vtpm-split as a library', () => {
  it("docs/cli.md's example compiles against the package's exports and runs as printed", async () => {
    // A project that depends on vtpm-split (a link to this checkout, as `npm install <path>` makes).
    fs.mkdirSync(join(work, 'node_modules'));
    fs.symlinkSync(ROOT, join(work, 'node_modules', 'vtpm-split'));
    fs.writeFileSync(join(work, 'package.json'), JSON.stringify({ name: 'example', type: 'module', private: true }));
    fs.writeFileSync(
      join(work, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, skipLibCheck: true, typeRoots: [join(ROOT, 'node_modules/@types')], types: ['node'] },
        files: ['example.mts'],
      }),
    );
    fs.writeFileSync(join(work, 'example.mts'), example());
    await exec(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', work]).catch((err: { stdout?: string }) => {
      throw new Error(`tsc: ${err.stdout}`);
    });
    const { stdout } = await exec(process.execPath, [join(work, 'example.mjs')], { cwd: work, env: { ...process.env, VTPM_NO_SETUP: '1' } });
    const lines = stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^engine: rc 0x0, random [0-9a-f]{16}$/);
    expect(lines.slice(1)).toEqual([...DAEMON_ROLES.map((r) => `${r} dom0 running`), 'guest dom1 running']);
  });

  it('names its entry point in package.json (main, types, exports)', () => {
    const pkg = JSON.parse(fs.readFileSync(join(ROOT, 'package.json'), 'utf8')) as { main?: string; exports?: Record<string, { import?: string; types?: string }> };
    expect(pkg.exports?.['.']).toEqual({ types: './dist/src/index.d.ts', import: './dist/src/index.js' });
    expect(fs.existsSync(join(ROOT, pkg.main!))).toBe(true);
  });
});
