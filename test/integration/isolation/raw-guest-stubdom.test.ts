// The raw hostile guest against a stub-domain host: there the guest's own vTPM domain, not dom0, reads
// what the guest writes. It moves what that backend reads while it reads it (double fetch) on the v2
// page and on the ring; the stub domain validates a private copy, answers within the guest's pages or
// cuts the guest off alone with one escaped log line, and the other guests keep being served within 2 s.
// The probe: nothing of dom0, of the other guests or of any stub domain (its own included) is reachable.
import { beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { join } from 'node:path';
import { isolatedSuite, runRawGuest, vtpmDomains, type IsolatedHost, type Outcome } from './harness.js';

const suite = isolatedSuite('stubdom');
let host: IsolatedHost;

beforeAll(() => {
  host = suite.host();
});

/** Lines about dom<domid> in the backend log, where the stub domains' output goes too. */
function lines(domid: number): string[] {
  return fs.readFileSync(join(host.runDir, 'logs', 'backend.log'), 'utf8').split('\n').filter((l) => l.includes(`dom${domid}:`));
}

function cutOffAlone(domid: number, rounds: Outcome[]): void {
  const mine = lines(domid);
  for (const l of mine) expect(l, 'log line escaped').toMatch(/^[\x20-\x7e]*$/);
  const cuts = mine.filter((l) => l.includes(`dom${domid}: cut off`));
  expect(cuts, `dom${domid}'s cut-off lines`).toHaveLength(rounds.some((o) => o.outcome !== 'ok') ? 1 : 0);
  // The cut-off came from the guest's own vTPM domain.
  for (const c of cuts) expect(c).toMatch(/vtpm-stubdom \d+: dom\d+: cut off/);
}

function lastRefusedOnly(rounds: Outcome[]): void {
  const first = rounds.findIndex((o) => o.outcome !== 'ok');
  if (first >= 0) expect(first).toBe(rounds.length - 1);
}

describe('a raw guest changing what its vTPM stub domain reads (double fetch)', () => {
  it('v2 page: flips after SUBMIT get whole answers within the page or a cut-off', async () => {
    const out = await runRawGuest(host, 32, 'dfetch-v2');
    expect(out.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = out.filter((o) => o.case === 'dfetch-v2-round');
    expect(rounds.length).toBeGreaterThan(0);
    expect(rounds.filter((o) => !(o.detail as { hostile: boolean }).hostile).map((o) => o.outcome)).toEqual(['ok', 'ok', 'ok', 'ok']);
    for (const o of rounds.filter((r) => r.outcome === 'ok')) {
      const d = o.detail as { length: number; size: number; steps: number };
      expect(d.steps).toBeGreaterThan(1000);
      expect(d.length).toBeGreaterThanOrEqual(10);
      expect(d.length).toBeLessThanOrEqual(4088);
      expect(d.size).toBe(d.length);
    }
    lastRefusedOnly(rounds);
    expect(out.find((o) => o.case === 'dfetch-other-frames')?.detail).toEqual({ checked: 8, changed: false });
    cutOffAlone(32, rounds);
    await suite.othersUnharmed();
  });

  it('ring: req_prod moving both ways and slots rewritten after notifying get answers within the granted page or a cut-off', async () => {
    const out = await runRawGuest(host, 33, 'dfetch-ring');
    expect(out.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = out.filter((o) => o.case === 'dfetch-ring-round');
    expect(rounds.length).toBeGreaterThan(0);
    for (const o of rounds) expect((o.detail as { maxLength: number }).maxLength).toBeLessThanOrEqual(4096);
    lastRefusedOnly(rounds);
    expect(out.find((o) => o.case === 'dfetch-other-frames')?.detail).toEqual({ checked: 8, changed: false });
    cutOffAlone(33, rounds);
    await suite.othersUnharmed();
  });

  it('ring: req_prod moved back behind what was consumed cuts the guest off without serving stale slots', async () => {
    const out = await runRawGuest(host, 34, 'dfetch-ring-back');
    expect(out.find((o) => o.case === 'connected')?.outcome).toBe('ok');
    const rounds = out.filter((o) => o.case === 'dfetch-ring-back');
    expect(rounds.map((o) => o.outcome)).toEqual(['refused']);
    cutOffAlone(34, rounds);
    expect(lines(34).join('\n')).toMatch(/dom34: cut off: bogus ring requests: req_prod \d+ (moved back behind req_cons|is \d+ past rsp_prod_pvt)/);
    await suite.othersUnharmed();
  });
});

describe('a raw guest on a stub-domain host', () => {
  it('cannot read, list, connect to, write or signal anything of dom0, the other guests or any vTPM stub domain', async () => {
    const probe = await runRawGuest(host, 35, 'probe');
    expect(probe.find((o) => o.case === 'own-xenstore')?.outcome).toBe('reached');
    const cases = probe.filter((o) => !['own-xenstore', 'done'].includes(o.case));
    expect(cases.length).toBeGreaterThan(40);
    expect(vtpmDomains(host).length).toBeGreaterThanOrEqual(2);
    expect(cases.filter((o) => /\(vtpm-domain dom\d+\)$/.test(o.target ?? '')).length).toBeGreaterThanOrEqual(8);
    const show = (o: Outcome): string => `${o.case} ${o.target}: ${o.outcome}${o.code ? ` (${o.code})` : ''}`;
    expect(cases.filter((o) => o.outcome !== 'refused').map(show)).toEqual([]);
    await suite.othersUnharmed();
  });
});
