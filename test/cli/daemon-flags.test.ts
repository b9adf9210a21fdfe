// V8 flags for the processes `vtpm` starts: none unless VTPM_DAEMON_V8_FLAGS names some; then every
// daemon (here the hypervisor, started for real) runs with them on its node command line.
import { afterAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { dist, freshXenDir } from '../helpers/child.js';
import { removeDir, tempDir } from '../helpers/temp.js';

// The built module: the daemon it starts is dist's main.js.
const { daemonV8Flags, startDaemon, stopProcess } = (await import(dist('src/cli/spawn.js'))) as typeof import('../../src/cli/spawn.js');

const xen = freshXenDir();
const logs = tempDir('daemon-flags');
afterAll(() => {
  removeDir(xen);
  removeDir(logs);
});

const cmdline = (pid: number): string[] => fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0').filter((a) => a !== '');

describe('daemon V8 flags', () => {
  it('are none by default and the space-separated list VTPM_DAEMON_V8_FLAGS gives', () => {
    expect(daemonV8Flags({})).toEqual([]);
    expect(daemonV8Flags({ VTPM_DAEMON_V8_FLAGS: '' })).toEqual([]);
    expect(daemonV8Flags({ VTPM_DAEMON_V8_FLAGS: ' --always-sparkplug  --max-lazy ' })).toEqual(['--always-sparkplug', '--max-lazy']);
  });

  it('go on a started daemon\'s node command line, before its script', async () => {
    const saved = process.env.VTPM_DAEMON_V8_FLAGS;
    process.env.VTPM_DAEMON_V8_FLAGS = '--always-sparkplug';
    let pid = -1;
    try {
      ({ pid } = await startDaemon(['hypervisor', '--dir', xen, '--verbose'], join(logs, 'hypervisor.log'), /vtpm-hypervisor: ready/));
      const args = cmdline(pid);
      expect(args.indexOf('--always-sparkplug')).toBeGreaterThan(0);
      expect(args.indexOf('--always-sparkplug')).toBeLessThan(args.findIndex((a) => a.endsWith('main.js')));
    } finally {
      if (saved === undefined) delete process.env.VTPM_DAEMON_V8_FLAGS;
      else process.env.VTPM_DAEMON_V8_FLAGS = saved;
      if (pid > 0) await stopProcess(pid);
    }
  });
});
