// A vTPM domain is a process per guest (multi and stubdom modes), so what its entry point loads is
// paid once per guest. It must not load what only dom0 or QEMU endpoints use: koffi's package loader
// (node:https, node:zlib and their TLS/HTTP stack, for downloading binaries), child_process (starting a
// hypervisor) or worker_threads (the SCM_RIGHTS reader thread). The domains run with small V8 heaps.
import { describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { dist } from '../helpers/child.js';
import { DEFAULT_DOMAIN_NODE_FLAGS, domainNodeFlags } from '../../src/backend/domain-flags.js';

/** What a fresh process has loaded after importing `entry` (its main guard does not run): Node built-ins and CommonJS files. */
function loadedAfterImport(entry: string): { builtins: string[]; cjs: string[] } {
  const out = execFileSync(process.execPath, [
    '--input-type=module',
    '-e',
    `import { createRequire } from 'node:module';
    await import(${JSON.stringify(entry)});
    console.log(JSON.stringify({ builtins: process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)), cjs: Object.keys(createRequire(import.meta.url).cache) }));`,
  ]);
  return JSON.parse(out.toString()) as { builtins: string[]; cjs: string[] };
}
const builtinsAfterImport = (entry: string): string[] => loadedAfterImport(entry).builtins;

const DOM0_ONLY = ['https', 'http', 'tls', 'zlib', 'child_process', 'worker_threads'];

describe('what a vTPM-domain process loads', () => {
  it.each([
    ['koffi through native/koffi.ts', dist('native/koffi.js')],
    ['the multi-VM domain entry point', dist('src/backend/vtpm-domain-main.js')],
    ['the stub-domain entry point', dist('src/backend/stubdom-main.js')],
  ])('%s loads none of node:https, zlib, tls, child_process, worker_threads', (_what, entry) => {
    const loaded = builtinsAfterImport(entry);
    expect(loaded.length).toBeGreaterThan(10); // the probe worked
    expect(loaded.filter((m) => DOM0_ONLY.includes(m))).toEqual([]);
  });

  it.each([
    ['the multi-VM domain entry point', dist('src/backend/vtpm-domain-main.js')],
    ['the stub-domain entry point', dist('src/backend/stubdom-main.js')],
  ])('%s loads no metrics library (prom-client, @opentelemetry/api): a domain serves no metrics', (_what, entry) => {
    const { cjs } = loadedAfterImport(entry);
    expect(cjs.some((f) => f.includes('/koffi/'))).toBe(true); // the probe saw CommonJS files
    expect(cjs.filter((f) => /node_modules\/(prom-client|@opentelemetry)\//.test(f))).toEqual([]);
  });

  it('native/koffi.ts is the same koffi the package gives (same version, same API)', async () => {
    const ours = (await import('../../native/koffi.js')).default as unknown as Record<string, unknown>;
    const pkg = (await import('koffi')).default as unknown as Record<string, unknown>;
    expect(ours['version']).toBe(pkg['version']);
    for (const fn of ['load', 'struct', 'pointer', 'proto', 'register', 'decode', 'encode', 'as', 'config', 'view']) expect(typeof ours[fn], fn).toBe('function');
  });
});

describe('domain node flags', () => {
  it('default to a 1 MiB young generation, a capped old one, gc() for start-up garbage and lite mode; VTPM_DOMAIN_NODE_FLAGS replaces them', () => {
    expect(domainNodeFlags({})).toEqual(DEFAULT_DOMAIN_NODE_FLAGS);
    expect(DEFAULT_DOMAIN_NODE_FLAGS).toEqual(expect.arrayContaining(['--max-semi-space-size=1', '--expose-gc', '--lite-mode']));
    expect(domainNodeFlags({ VTPM_DOMAIN_NODE_FLAGS: '' })).toEqual([]);
    // A domain's stderr is the backend's log: the flags must not make V8 warn there at every start.
    const r = spawnSync(process.execPath, [...DEFAULT_DOMAIN_NODE_FLAGS, '-e', 'process.stdout.write(String(typeof gc))']);
    expect(r.status).toBe(0);
    expect(r.stdout.toString()).toBe('function');
    expect(r.stderr.toString()).toBe('');
    expect(domainNodeFlags({ VTPM_DOMAIN_NODE_FLAGS: ' --max-old-space-size=16  --jitless ' })).toEqual(['--max-old-space-size=16', '--jitless']);
  });
});
