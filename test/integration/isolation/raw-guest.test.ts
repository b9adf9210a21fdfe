// The raw hostile guest (raw-guest.mjs) as a real guest under its own uid, next to two well-behaved
// guests running TPM commands, on a multi-VM host (each vTPM in its own vTPM-domain process, another
// uid again): every path and descriptor of dom0 and of the other domains is refused, the others'
// commands keep completing (none slower than 2 s), no daemon dies or grows past 64 MiB.
import { beforeAll, describe, expect, it } from 'vitest';
import { connect } from '../../../src/xenstore/client.js';
import { isolatedSuite, runRawGuest, vtpmDomains, type IsolatedHost, type Outcome } from './harness.js';

const suite = isolatedSuite('multi');
let host: IsolatedHost;
let nextDomid = 20;

beforeAll(() => {
  host = suite.host();
});

const othersUnharmed = (): Promise<void> => suite.othersUnharmed(500);

const inXenDir = (o: Outcome): boolean => (o.target ?? '').startsWith(`${host.h.xenDir}/`);
const show = (o: Outcome): string => `${o.case} ${o.target}: ${o.outcome}${o.code ? ` (${o.code})` : ''}${o.detail !== undefined ? ` ${JSON.stringify(o.detail)}` : ''}`;

describe('a raw guest under its own uid', () => {
  let probe: Outcome[];

  beforeAll(async () => {
    probe = await runRawGuest(host, nextDomid++, 'probe');
  });

  it('reaches its own xenstore socket (the launch works at all)', () => {
    expect(probe.find((o) => o.case === 'own-xenstore')?.outcome).toBe('reached');
  });

  it('cannot read, list, connect to, write or signal anything of dom0 or of the other guests', async () => {
    // The hypervisor dir is the next case; TCTI ports the one after.
    const cases = probe.filter((o) => !['own-xenstore', 'done', 'tpm-command'].includes(o.case) && !inXenDir(o));
    expect(cases.length).toBeGreaterThan(40);
    // The good guests' vTPM domains were among the targets.
    expect(vtpmDomains(host).length).toBeGreaterThanOrEqual(2);
    expect(cases.filter((o) => /\(vtpm-domain dom\d+\)$/.test(o.target ?? '')).length).toBeGreaterThanOrEqual(8);
    const through = cases.filter((o) => o.outcome !== 'refused');
    expect(through.map(show)).toEqual([]);
    await othersUnharmed();
  });

  it("cannot open or connect to anything in the hypervisor dir: the hypervisor's socket, dom0's or anyone's memory", () => {
    const xen = probe.filter(inXenDir);
    expect(xen.length).toBeGreaterThanOrEqual(1);
    expect(xen.filter((o) => o.outcome !== 'refused').map(show)).toEqual([]);
  });

  it("cannot run TPM commands on another guest's TCTI ports (data and control)", () => {
    const tcti = probe.filter((o) => o.case === 'tpm-command');
    expect(tcti).toHaveLength(4);
    expect(tcti.filter((o) => o.outcome !== 'refused').map(show)).toEqual([]);
  });
});

describe('a raw guest writing half frames to every socket it can reach', () => {
  it('stalls only its own connections: dom0 still talks to xenstored and the other guests are served', async () => {
    const raw = runRawGuest(host, nextDomid++, 'half-frames');
    await new Promise((r) => setTimeout(r, 1500));
    const xs = await connect(host.h.xenstoredSocket);
    try {
      const t0 = performance.now();
      expect(await xs.readString('/local/domain/1/device/vtpm/0/state')).toBe('4');
      expect(performance.now() - t0).toBeLessThan(2000);
    } finally {
      await xs.close();
    }
    const lines = await raw;
    const own = lines.filter((o) => o.case === 'half-frame' && o.target?.startsWith(`${host.h.domainSocketDir}/`));
    expect(own.map((o) => o.outcome)).toEqual(['reached', 'reached']);
    // The hypervisor's socket, whatever else its dir holds and the others' TCTI ports never even took the bytes.
    const others = lines.filter((o) => o.case === 'half-frame' && (inXenDir(o) || /^127\.0\.0\.1:/.test(o.target ?? '')));
    expect(others.length).toBeGreaterThanOrEqual(3);
    expect(others.filter((o) => o.outcome !== 'refused').map(show)).toEqual([]);
    await othersUnharmed();
  });
});

describe('a raw guest flooding xenstore', () => {
  it('is refused (node quota, transaction quota) while xenstored stays within 64 MiB', async () => {
    const lines = await runRawGuest(host, nextDomid++, 'flood', 180_000);
    const nodes = lines.find((o) => o.case === 'flood-nodes')!;
    const tx = lines.find((o) => o.case === 'flood-transaction')!;
    // Refused by a quota, after the guest got its share (not on the first write for some other reason).
    expect(show(nodes)).toMatch(/: refused .*"refusal":"E(QUOTA|NOSPC|2BIG)/);
    expect((nodes.detail as { ok: number }).ok).toBeGreaterThan(100);
    expect(show(tx)).toMatch(/: refused .*"refusal":"E(QUOTA|NOSPC|2BIG)/);
    expect((tx.detail as { ok: number }).ok).toBeGreaterThan(0);
    await othersUnharmed();
  });
});
