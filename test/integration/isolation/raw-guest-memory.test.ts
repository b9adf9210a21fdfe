// The raw hostile guest against its own shared memory, next to two working guests: random words over
// its whole grant table and frames, then its memory truncated under the backend's mapping. The guest
// is cut off; the backend survives (no SIGBUS), the others' commands keep completing within 2 s.
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { alive } from '../../../src/cli/rundir.js';
import { daemons, rss, runRawGuest, startHost, stopHost, type IsolatedHost } from './harness.js';

let host: IsolatedHost;
let rssBefore = new Map<number, number>();

beforeAll(async () => {
  host = await startHost();
});

afterAll(async () => {
  await stopHost(host);
});

beforeEach(() => {
  for (const l of host.loads) l.reset();
  rssBefore = new Map(daemons(host).map((d) => [d.pid, rss(d.pid)]));
});

async function othersUnharmed(): Promise<void> {
  await new Promise((r) => setTimeout(r, 1000));
  for (const d of daemons(host)) {
    expect(alive(d.pid), `${d.role} (pid ${d.pid}) alive`).toBe(true);
    expect(rss(d.pid) - (rssBefore.get(d.pid) ?? 0), `${d.role} RSS growth`).toBeLessThan(64 << 20);
  }
  for (const l of host.loads) {
    expect(l.failures, `dom${l.domid}'s commands`).toEqual([]);
    expect(l.done, `dom${l.domid} completed commands`).toBeGreaterThan(0);
    expect(l.slowestMs, `dom${l.domid}'s slowest command (ms)`).toBeLessThan(2000);
  }
}

describe('a raw guest attacking its own memory', () => {
  it('scribbling over its grant table and frames gets it cut off, nobody else', async () => {
    const lines = await runRawGuest(host, 30, 'scribble');
    expect(lines.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    // The raw SUBMIT with a length past the page is what the backend must catch; it names the guest.
    expect(fs.readFileSync(join(host.runDir, 'logs', 'backend.log'), 'utf8')).toMatch(/dom30: cut off/);
    expect(lines.find((o) => o.case === 'command-after-scribble')?.outcome).toBe('refused');
    await othersUnharmed();
  });

  it('truncating its memory under the backend does not take the backend down', async () => {
    const lines = await runRawGuest(host, 31, 'truncate');
    expect(lines.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    await othersUnharmed();
  });
});
