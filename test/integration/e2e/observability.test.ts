// Observability of a live host (docs/observability.md): `host up --metrics` serves every daemon's
// metrics in one exposition that promtool accepts; `guest attach --pcap` captures a tpm2-tools session
// that tshark's TPM 2.0 dissector decodes, with the device's xenstore traffic and ring events decoded
// by our Lua dissector; `--log-format json` logs one object per event; `vtpm top` lists the guests; a
// guest cut off for a protocol violation is counted by reason.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT } from '../../helpers/child.js';
import { run, tcti, until, vtpm } from '../../helpers/host.js';
import { freePortPair } from '../../../src/cli/ports.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const LUA = join(ROOT, 'tools/wireshark/vtpm-split.lua');

const work = tempDir('obs');
const runDir = join(work, 'run');
const vm1 = randomUUID();
const vm2 = randomUUID();
const pcap1 = join(work, 'dom1.pcapng');
const pcap2 = join(work, 'dom2.pcapng');
let metricsPort = 0;
let port1 = 0;
let port2 = 0;
let started = 0;

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const p = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return p;
}

const tools = (port: number) => ({ env: tcti(port) });

async function scrape(): Promise<string> {
  const r = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
  expect(r.status).toBe(200);
  expect(r.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return r.text();
}

/** The value of the one series of `name` whose labels include all of `labels`. */
function value(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

beforeAll(async () => {
  started = Date.now();
  metricsPort = await freePort();
  await vtpm('host', 'up', '--run', runDir, '--state', join(work, 'state'), '--metrics', `127.0.0.1:${metricsPort}`, '--log-format', 'json');
  port1 = await freePortPair();
  port2 = await freePortPair();
  await vtpm('guest', 'attach', '--run', runDir, '--domid', '1', '--vm', vm1, '--tcti-port', String(port1), '--pcap', pcap1);
  await vtpm('guest', 'attach', '--run', runDir, '--domid', '2', '--vm', vm2, '--protocol', 'ring', '--tcti-port', String(port2), '--pcap', pcap2, '--pcap-max-mb', '5');
  // A tpm2-tools session on each guest.
  for (const p of [port1, port2]) {
    await run('tpm2_getrandom', ['8', '--hex'], tools(p));
    await run('tpm2_pcrextend', [`16:sha256=${'ab'.repeat(32)}`], tools(p));
    await run('tpm2_pcrread', ['sha256:16'], tools(p));
  }
}, 120_000);

afterAll(async () => {
  await vtpm('host', 'down', '--run', runDir).catch(() => {});
  removeDir(work);
});

describe('metrics', () => {
  it('one scrape of host up --metrics shows all four daemons, and promtool check metrics finds nothing to fix', async () => {
    const text = await scrape();
    for (const d of ['hypervisor', 'xenstored', 'manager', 'backend']) expect(value(text, 'vtpm_daemon_up', { daemon: d })).toBe(1);
    const p = await new Promise<{ code: number; out: string }>((resolve) => {
      const c = execFile('promtool', ['check', 'metrics'], (err, so, se) => resolve({ code: err ? (err as { code?: number }).code ?? 1 : 0, out: so + se }));
      c.stdin!.end(text);
    });
    expect(p.out).toBe('');
    expect(p.code).toBe(0);
  });

  it('counts each guest\'s commands by transport, command and outcome, with latency histograms and guest states', async () => {
    const text = await scrape();
    for (const [domid, vm, transport] of [['1', vm1, 'v2'], ['2', vm2, 'ring']] as const) {
      const l = { domid, vm, transport };
      expect(value(text, 'vtpm_commands_total', { ...l, command: 'GetRandom', rc: 'success' })).toBeGreaterThanOrEqual(1);
      expect(value(text, 'vtpm_commands_total', { ...l, command: 'PCR_Extend', rc: 'success' })).toBe(1);
      expect(value(text, 'vtpm_commands_total', { ...l, command: 'PCR_Read', rc: 'success' })).toBe(1);
      expect(value(text, 'vtpm_command_duration_seconds_count', l)).toBeGreaterThanOrEqual(4);
      expect(value(text, 'vtpm_guest_info', { domid, vm, transport, state: 'Connected' })).toBe(1);
    }
    expect(value(text, 'vtpm_guests', { transport: 'v2', state: 'Connected' })).toBe(1);
    expect(value(text, 'vtpm_guests', { transport: 'ring', state: 'Connected' })).toBe(1);
    // The ring's answers wait for durable checkpoints at the manager: saves, commits, fsyncs.
    expect(value(text, 'vtpm_manager_saves_total', {})).toBeGreaterThan(0);
    expect(value(text, 'vtpm_manager_commits_total', { kind: 'log' })).toBeGreaterThan(0);
    expect(value(text, 'vtpm_manager_fsync_duration_seconds_count', {})).toBeGreaterThan(0);
    expect(value(text, 'vtpm_manager_group_commit_size_count', {})).toBeGreaterThan(0);
    expect(value(text, 'vtpm_xenstore_requests_total', { type: 'WRITE' })).toBeGreaterThan(0);
    expect(value(text, 'vtpm_xenstore_watch_events_total', {})).toBeGreaterThan(0);
    // dom0 (the backend's) and the two guests live in the hypervisor; the backend mapped their pages.
    expect(value(text, 'vtpm_hypervisor_domains', {})).toBeGreaterThanOrEqual(3);
    expect(value(text, 'vtpm_hypervisor_hypercalls_total', { op: 'map_grant' })).toBeGreaterThan(0);
    // Labels never carry request ids: every vtpm_commands_total series has exactly the five labels.
    for (const line of text.split('\n').filter((x) => x.startsWith('vtpm_commands_total{'))) {
      expect(line.match(/([a-z_]+)="/g)!.map((m) => m.slice(0, -2)).sort()).toEqual(['command', 'daemon', 'domid', 'rc', 'transport', 'vm']);
    }
  });

  it('a guest cut off for lying about its ring indices is counted by reason, and the others keep working', async () => {
    const before = value(await scrape(), 'vtpm_guests_cut_off_total', { reason: 'ring_indices' }) ?? 0;
    await vtpm('guest', 'attach', '--run', runDir, '--domid', '3', '--vm', randomUUID(), '--protocol', 'ring', '--misbehave', 'garbage-indices');
    const text = await until(async () => {
      const t = await scrape();
      return (value(t, 'vtpm_guests_cut_off_total', { reason: 'ring_indices' }) ?? 0) > before ? t : undefined;
    }, 'the cut-off to be counted');
    expect(value(text, 'vtpm_guests_cut_off_total', { reason: 'ring_indices' })).toBe(before + 1);
    expect(value(text, 'vtpm_guest_last_error_timestamp_seconds', { domid: '3', error: 'cut_off_ring_indices' })).toBeGreaterThan(started / 1000 - 1);
    const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], tools(port1));
    expect(stdout).toMatch(/^[0-9a-f]{16}$/);
    await vtpm('guest', 'detach', '--run', runDir, '--domid', '3');
  });
});

describe('captures', () => {
  /** tshark's fields of every packet of `file` matching `filter`, one array per packet. */
  async function fields(file: string, filter: string, names: string[], lua = false): Promise<string[][]> {
    const args = [...(lua ? ['-X', `lua_script:${LUA}`] : []), '-r', file, '-Y', filter, '-T', 'fields', '-E', 'separator=|', ...names.flatMap((n) => ['-e', n])];
    const { stdout } = await run('tshark', args, { maxBuffer: 16 << 20 });
    return stdout.trim().split('\n').filter(Boolean).map((l) => l.split('|'));
  }

  // The capture is written in the background every 200 ms.
  const flushed = (): Promise<unknown> => sleep(500);

  for (const [name, file] of [['v2', pcap1], ['ring', pcap2]] as const) {
    it(`tshark's TPM 2.0 dissector decodes the ${name} guest's tpm2-tools session: commands, response codes, one TCP stream, real timestamps`, async () => {
      await flushed();
      const cmds = await fields(file, 'tpm.req.cc', ['tpm.req.cc', 'tcp.stream', 'frame.time_epoch']);
      const names = cmds.map((c) => c[0]);
      // 0x17b GetRandom, 0x182 PCR_Extend, 0x17e PCR_Read, in the order tpm2-tools sent them.
      const order = ['0x0000017b', '0x00000182', '0x0000017e'].map((cc) => names.indexOf(cc));
      expect(order.every((i) => i >= 0)).toBe(true);
      expect([...order].sort((a, b) => a - b)).toEqual(order);
      expect(new Set(cmds.map((c) => c[1]))).toEqual(new Set(['0']));
      for (const c of cmds) {
        const t = Number(c[2]) * 1000;
        expect(t).toBeGreaterThan(started - 1000);
        expect(t).toBeLessThan(Date.now() + 1000);
      }
      const rsps = await fields(file, 'tpm.resp.rc', ['tpm.resp.rc', 'tcp.srcport']);
      expect(rsps.length).toBeGreaterThanOrEqual(cmds.length - 1);
      expect(rsps.every((r) => r[1] === '2321')).toBe(true);
      // tpm2_pcrextend's answer: success.
      const all = await fields(file, 'tpm', ['tpm.req.cc', 'tpm.resp.rc']);
      const ext = all.findIndex((r) => r[0] === '0x00000182');
      expect(all[ext + 1]![1]).toBe('0x00000000');
    });
  }

  it('our Lua dissector decodes the device\'s xenstore traffic and the ring events: every request taken has its response', async () => {
    await flushed();
    const xs = await fields(pcap2, 'vtpmsplit.kind == 1', ['vtpmsplit.xs.type', 'vtpmsplit.xs.arg', 'vtpmsplit.domid'], true);
    // The backend switching dom2's device to Connected (4): an xs_wire WRITE of its state node.
    expect(xs.some((r) => r[0] === '11' && r[1] === '/local/domain/0/backend/vtpm/2/0/state,4')).toBe(true);
    expect(xs.every((r) => r[2] === '2')).toBe(true);
    const ring = await fields(pcap2, 'vtpmsplit.kind == 2', ['vtpmsplit.ring.event', 'vtpmsplit.ring.id', 'vtpmsplit.ring.status'], true);
    const taken = ring.filter((r) => r[0] === '2').map((r) => r[1]);
    const answered = ring.filter((r) => r[0] === '3').map((r) => r[1]);
    expect(taken.length).toBeGreaterThanOrEqual(4);
    expect(answered).toEqual(taken);
    expect(ring.filter((r) => r[0] === '3').every((r) => r[2] === '0')).toBe(true);
    // The TPM commands in the same file: as many as requests taken.
    expect((await fields(pcap2, 'tpm.req.cc', ['tpm.req.cc'])).length).toBe(taken.length);
    // The v2 guest's page: a SUBMIT and a FINISH per command.
    const v2 = await fields(pcap1, 'vtpmsplit.kind == 2', ['vtpmsplit.ring.event'], true);
    const submits = v2.filter((r) => r[0] === '5').length;
    expect(submits).toBeGreaterThanOrEqual(4);
    expect(v2.filter((r) => r[0] === '6').length).toBe(submits);
  });

  it('our Lua dissector decodes the guest\'s own xenstore connection from its first step: the handshake\'s state writes, watches and watch events', async () => {
    await flushed();
    for (const [domid, file] of [[1, pcap1], [2, pcap2]] as const) {
      const rows = await fields(file, 'vtpmsplit.kind == 4', ['vtpmsplit.dir', 'vtpmsplit.xs.type', 'vtpmsplit.xs.arg', 'vtpmsplit.domid', 'frame.time_epoch'], true);
      const fe = `/local/domain/${domid}/device/vtpm/0`;
      const be = `/local/domain/0/backend/vtpm/${domid}/0`;
      // The guest (dir 1) finds its backend: its first read is of its own device's backend-id.
      expect(rows[0]!.slice(0, 3)).toEqual(['1', '2', `${fe}/backend-id`]);
      // Its xs_wire WRITEs (type 11) of its state: Initialised (3), then Connected (4).
      const states = rows.filter((r) => r[0] === '1' && r[1] === '11' && r[2]!.startsWith(`${fe}/state,`)).map((r) => r[2]);
      expect(states.slice(0, 2)).toEqual([`${fe}/state,3`, `${fe}/state,4`]);
      // It watches the backend's state, and xenstored (dir 0) sends it WATCH_EVENTs (15) of that path.
      expect(rows.some((r) => r[0] === '1' && r[1] === '4' && r[2]!.startsWith(`${be}/state,`))).toBe(true);
      expect(rows.filter((r) => r[0] === '0' && r[1] === '15' && r[2]!.startsWith(`${be}/state,`)).length).toBeGreaterThanOrEqual(2);
      expect(rows.every((r) => r[3] === String(domid))).toBe(true);
      // Stamped by xenstored's clock, in this run.
      for (const r of rows) expect(Number(r[4]) * 1000).toBeGreaterThan(started - 1000);
    }
  });

  it('guest attach --pcap refuses a file in a directory that does not exist, before anything starts', async () => {
    const r = await vtpm('guest', 'attach', '--run', runDir, '--domid', '4', '--vm', randomUUID(), '--pcap', join(work, 'nope', 'x.pcapng')).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => e,
    );
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`vtpm: --pcap ${join(work, 'nope', 'x.pcapng')}: directory ${join(work, 'nope')} does not exist\n`);
  });
});

describe('logs and top', () => {
  it('--log-format json: every daemon writes one JSON object per line; events carry domid, vm and instance', () => {
    for (const d of ['hypervisor', 'xenstored', 'manager', 'backend']) {
      const lines = fs.readFileSync(join(runDir, 'logs', `${d}.log`), 'utf8').split('\n').filter(Boolean);
      // The ready lines of xenstored and the hypervisor are their start-up handshake on stdout, not log events.
      const events = lines.filter((l) => !/^(xenstored listening|vtpm-hypervisor: ready|vtpm-manager: ready)/.test(l));
      for (const l of events) {
        const o = JSON.parse(l) as { daemon: string; event: string; msg: string; time: string };
        expect(o.daemon).toBe(d);
        expect(typeof o.event).toBe('string');
        expect(typeof o.msg).toBe('string');
      }
    }
    const backend = fs.readFileSync(join(runDir, 'logs', 'backend.log'), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    const connected = backend.find((o) => o.event === 'connected' && o.domid === 2)!;
    expect(connected).toMatchObject({ daemon: 'backend', domid: 2, vm: vm2, event: 'connected' });
    expect(typeof connected.instance).toBe('number');
    const cut = backend.find((o) => o.event === 'cut_off' && o.domid === 3)!;
    expect(cut.msg).toMatch(/^dom3: cut off: /);
  });

  it('vtpm top --once lists each guest with its transport, state, commands/s and p99', async () => {
    let done = false;
    const load = (async () => {
      while (!done) await run('tpm2_getrandom', ['8', '--hex'], tools(port2));
    })();
    const { stdout } = await vtpm('top', '--run', runDir, '--once', '--interval', '2').finally(() => (done = true));
    await load;
    const lines = stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^GUEST\s+VM\s+TRANSPORT\s+STATE\s+CMD\/S\s+P99\s+LAST ERROR$/);
    const row = (domid: number): string[] => lines.find((l) => l.startsWith(`dom${domid} `))!.split(/\s{2,}/);
    expect(row(1).slice(0, 4)).toEqual(['dom1', vm1.slice(0, 8), 'v2', 'Connected']);
    expect(row(2).slice(0, 4)).toEqual(['dom2', vm2.slice(0, 8), 'ring', 'Connected']);
    expect(Number(row(2)[4])).toBeGreaterThan(0);
    expect(row(2)[5]).toMatch(/^[0-9.]+ (µs|ms|s)$/);
  });
});

describe('suspend and resume', () => {
  it('are counted with their durations, and the resumed connection is a new TCP stream of the same capture', async () => {
    await vtpm('guest', 'suspend', '--run', runDir, '--domid', '1');
    await vtpm('guest', 'resume', '--run', runDir, '--domid', '1');
    const { stdout } = await run('tpm2_getrandom', ['8', '--hex'], tools(port1));
    expect(stdout).toMatch(/^[0-9a-f]{16}$/);
    const text = await scrape();
    expect(value(text, 'vtpm_suspends_total', { transport: 'v2' })).toBe(1);
    expect(value(text, 'vtpm_suspend_duration_seconds_count', { transport: 'v2' })).toBe(1);
    expect(value(text, 'vtpm_resumes_total', { transport: 'v2' })).toBe(1);
    expect(value(text, 'vtpm_resume_duration_seconds_count', { transport: 'v2' })).toBe(1);
    await sleep(500);
    const { stdout: streams } = await run('tshark', ['-r', pcap1, '-Y', 'tpm.req.cc == 0x17b', '-T', 'fields', '-e', 'tcp.stream']);
    expect(new Set(streams.trim().split('\n'))).toEqual(new Set(['0', '1']));
  });
});

describe('the metrics endpoint across restarts', () => {
  it('host up --metrics refuses a malformed address with exit 2 before starting anything', async () => {
    const other = join(work, 'other');
    const r = await vtpm('host', 'up', '--run', other, '--state', join(work, 'other-state'), '--metrics', 'localhost').then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => e,
    );
    expect(r.code).toBe(2);
    expect(r.stderr).toBe('vtpm: --metrics takes HOST:PORT (e.g. 127.0.0.1:9464), not "localhost"\n');
    expect(fs.existsSync(other)).toBe(false);
  });

  it('host up --metrics on an address in use is refused before anything starts', async () => {
    const other = join(work, 'other2');
    const taken = net.createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', () => r()));
    const port = (taken.address() as net.AddressInfo).port;
    const r = await vtpm('host', 'up', '--run', other, '--state', join(work, 'other2-state'), '--metrics', `127.0.0.1:${port}`).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => e,
    );
    await new Promise((res) => taken.close(res));
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vtpm: --metrics 127.0.0.1:${port}: listen EADDRINUSE: address already in use 127.0.0.1:${port}\n`);
    expect(fs.existsSync(other)).toBe(false);
  });

  it('a backend killed and restarted serves the host\'s metrics again on the same address', async () => {
    const h = JSON.parse(fs.readFileSync(join(runDir, 'host.json'), 'utf8')) as { processes: Array<{ role: string; pid: number }> };
    const pid = h.processes.find((p) => p.role === 'backend')!.pid;
    process.kill(pid, 'SIGKILL');
    await expect(fetch(`http://127.0.0.1:${metricsPort}/metrics`)).rejects.toThrow();
    await vtpm('host', 'restart', 'backend', '--run', runDir);
    const text = await scrape();
    for (const d of ['hypervisor', 'xenstored', 'manager', 'backend']) expect(value(text, 'vtpm_daemon_up', { daemon: d })).toBe(1);
    // The guests reconnect to the new backend and are counted again.
    await until(async () => {
      const t = await scrape();
      return value(t, 'vtpm_guests', { state: 'Connected', transport: 'v2' }) === 1 && value(t, 'vtpm_guests', { state: 'Connected', transport: 'ring' }) === 1 ? true : undefined;
    }, 'both guests Connected to the restarted backend');
  });
});
