// The raw hostile guest against its own shared memory, next to two working guests: random words over
// its whole grant table and frames, then its memory truncated under the backend's mapping. The guest
// is cut off; the backend survives (no SIGBUS), the others' commands keep completing within 2 s.
import { beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { isolatedSuite, runRawGuest, type IsolatedHost } from './harness.js';

const suite = isolatedSuite();
let host: IsolatedHost;

beforeAll(() => {
  host = suite.host();
});

const othersUnharmed = (): Promise<void> => suite.othersUnharmed(1000);

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
