// Process identity in run directories: a guest record names one process, not whatever holds its pid
// later, and a killed guest that is still a zombie is not "attached".
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { alive, procStat } from '../../src/cli/rundir.js';

describe('alive()', () => {
  it('knows this process, and tells it from another with the same pid but another start time', () => {
    const st = procStat(process.pid)!;
    expect(st.state).toMatch(/^[RS]$/);
    expect(alive(process.pid)).toBe(true);
    expect(alive(process.pid, st.start)).toBe(true);
    expect(alive(process.pid, st.start + 1)).toBe(false);
    expect(alive(0)).toBe(false);
    expect(alive(2 ** 22 + 12345)).toBe(false); // above pid_max
  });

  it('counts a zombie (exited, not yet reaped by its parent) as dead', async () => {
    // A parent that forks a child which exits at once, and never waits for it.
    const parent = spawn('python3', ['-c', 'import os,sys,time\npid=os.fork()\nif pid==0: os._exit(0)\nprint(pid, flush=True)\ntime.sleep(30)'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      const line = await new Promise<string>((resolve) => createInterface({ input: parent.stdout }).once('line', resolve));
      const zombie = Number(line);
      for (let i = 0; i < 100 && procStat(zombie)?.state !== 'Z'; i++) await new Promise((r) => setTimeout(r, 10));
      expect(procStat(zombie)?.state).toBe('Z');
      expect(() => process.kill(zombie, 0)).not.toThrow(); // what the old check looked at
      expect(alive(zombie)).toBe(false);
    } finally {
      parent.kill('SIGKILL');
    }
  });
});
