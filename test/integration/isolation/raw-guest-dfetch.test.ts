// The raw hostile guest moving what the backend reads (double fetch), next to two working guests: on
// the v2 page it flips length, command bytes, locality and state after SUBMIT; on the ring it moves
// req_prod back and forth and rewrites the slot after notifying. The backend validates a private copy:
// the offender is answered consistently (within its own granted pages) or cut off alone with one
// escaped log line, the backend lives, the others' commands keep completing within 2 s.
import { beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { isolatedSuite, runRawGuest, type IsolatedHost, type Outcome } from './harness.js';

const suite = isolatedSuite();
let host: IsolatedHost;

beforeAll(() => {
  host = suite.host();
});

const othersUnharmed = (): Promise<void> => suite.othersUnharmed(1000);

/** The backend's lines about dom<domid>: at most one cut-off, every line printable (escaped). */
function backendLines(domid: number): string[] {
  const log = fs.readFileSync(join(host.runDir, 'logs', 'backend.log'), 'utf8');
  return log.split('\n').filter((l) => l.includes(`dom${domid}:`));
}

function cutOffAlone(domid: number, rounds: Outcome[]): void {
  const lines = backendLines(domid);
  const cuts = lines.filter((l) => l.includes(`dom${domid}: cut off`));
  for (const l of lines) expect(l, 'log line escaped').toMatch(/^[\x20-\x7e]*$/);
  const refused = rounds.some((o) => o.outcome !== 'ok');
  // A guest whose round went unanswered was cut off, once; one answered throughout was not cut off.
  expect(cuts, `dom${domid}'s cut-off lines`).toHaveLength(refused ? 1 : 0);
}

describe('a raw guest changing what the backend reads (double fetch)', () => {
  it('v2 page: length, command, locality and state flipping after SUBMIT get consistent answers or a cut-off', async () => {
    const lines = await runRawGuest(host, 32, 'dfetch-v2');
    expect(lines.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = lines.filter((o) => o.case === 'dfetch-v2-round');
    expect(rounds.length).toBeGreaterThan(0);
    // The in-range rounds come first and must all be answered: nothing there is a protocol violation.
    const inRange = rounds.filter((o) => !(o.detail as { hostile: boolean }).hostile);
    expect(inRange.map((o) => o.outcome)).toEqual(['ok', 'ok', 'ok', 'ok']);
    for (const o of rounds.filter((o) => o.outcome === 'ok')) {
      const d = o.detail as { length: number; size: number; tag: number; steps: number };
      expect(d.steps, 'the guest really flipped the page').toBeGreaterThan(1000);
      // One whole TPM response within the page: its header's size is the length published with it.
      expect(d.length).toBeGreaterThanOrEqual(10);
      expect(d.length).toBeLessThanOrEqual(4088);
      expect(d.size).toBe(d.length);
      expect([0x8001, 0x8002, 0x00c4]).toContain(d.tag);
      // A success is GetRandom(8)'s own answer: header, TPM2B of 8 bytes.
      if ((o.detail as { rc: number }).rc === 0) expect(d.length).toBe(20);
    }
    // Rounds after a missing answer do not run; a cut-off is the last round.
    const firstRefused = rounds.findIndex((o) => o.outcome !== 'ok');
    if (firstRefused >= 0) expect(firstRefused).toBe(rounds.length - 1);
    expect(lines.find((o) => o.case === 'dfetch-other-frames')?.detail, 'its never-granted frames untouched').toEqual({ checked: 8, changed: false });
    cutOffAlone(32, rounds);
    await othersUnharmed();
  });

  it('ring: req_prod moving both ways and the slot rewritten after notifying get an answer or a cut-off', async () => {
    const lines = await runRawGuest(host, 33, 'dfetch-ring');
    expect(lines.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = lines.filter((o) => o.case === 'dfetch-ring-round');
    expect(rounds.length).toBeGreaterThan(0);
    for (const o of rounds) {
      const d = o.detail as { steps: number; maxLength: number; answer?: string };
      expect(d.steps, 'the guest really moved the ring').toBeGreaterThan(1000);
      // Every response published on the ring fits the one data page the request granted.
      expect(d.maxLength).toBeLessThanOrEqual(4096);
    }
    const firstRefused = rounds.findIndex((o) => o.outcome !== 'ok');
    if (firstRefused >= 0) expect(firstRefused).toBe(rounds.length - 1);
    expect(lines.find((o) => o.case === 'dfetch-other-frames')?.detail, 'its never-granted frames untouched').toEqual({ checked: 8, changed: false });
    cutOffAlone(33, rounds);
    await othersUnharmed();
  });

  it('ring: req_prod moved back behind what the backend consumed cuts the guest off without serving stale slots', async () => {
    // Two slow requests pushed and taken by the backend, still unanswered: then req_prod - 1.
    const lines = await runRawGuest(host, 34, 'dfetch-ring-back');
    expect(lines.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = lines.filter((o) => o.case === 'dfetch-ring-back');
    const d = rounds[0]?.detail as { reqProd: number; reqEvent: number; answeredBefore: number };
    expect(d.reqEvent, 'the backend had consumed every request before req_prod moved back').toBe(d.reqProd + 1);
    expect(d.answeredBefore, 'some were still unanswered').toBeLessThan(d.reqProd);
    expect(rounds.map((o) => o.outcome)).toEqual(['refused']);
    cutOffAlone(34, rounds);
    // At most the guest's own request of that round is refused; no stale slot is taken for a new one.
    expect(backendLines(34).filter((l) => / dom34: request /.test(l)).length).toBeLessThanOrEqual(1);
    expect(backendLines(34).join('\n')).toMatch(/dom34: cut off: bogus ring requests: req_prod \d+ (moved back behind req_cons|is \d+ past rsp_prod_pvt)/);
    await othersUnharmed();
  });
});
