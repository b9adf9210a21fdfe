// Adaptive polling on the multi-request ring (docs/exactly-once.md "Round trips"): after answering, the
// backend's RingChannel watches the ring for the guest's next request, and a RingFront with one command
// outstanding watches for its answer, each with its port masked, so a peer that is quick costs neither
// side a wake-up. Each end runs in a process of its own (the other end in a child), a real swtpm answers
// the commands, and under CPU pressure both stand down and sleep on the event channel again.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, fork } from 'node:child_process';
import os from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT, freshXenDir } from '../helpers/child.js';
import { SwtpmProcess } from '../helpers/swtpm.js';
import { TpmClient } from '../helpers/tpm-client.js';
import { Domain } from '../../src/xen/index.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { responseCode as rc } from '../../src/tpm/wire.js';
import { removeDir } from '../helpers/temp.js';

const dirs: string[] = [];
let swtpm: SwtpmProcess;
let client: TpmClient;

/** A child from test/helpers with an IPC channel: its messages in order, and a way to stop it. */
function child(script: string, args: string[]) {
  const proc = fork(join(ROOT, 'test/helpers', script), args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const inbox: Array<Record<string, unknown>> = [];
  const waiting: Array<(m: Record<string, unknown>) => void> = [];
  proc.on('message', (m: Record<string, unknown>) => (waiting.length ? waiting.shift()!(m) : inbox.push(m)));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  return {
    pid: proc.pid!,
    next: (): Promise<Record<string, unknown>> => (inbox.length ? Promise.resolve(inbox.shift()!) : new Promise((r) => waiting.push(r))),
    send: (m: object) => proc.send(m),
    stop: async (): Promise<void> => {
      if (proc.exitCode === null && proc.signalCode === null) proc.send({ kind: 'exit' });
      await Promise.race([exited, sleep(5000).then(() => proc.kill('SIGKILL'))]);
    },
  };
}

/** Pin every thread of `pids` with taskset: `cpus(pid)` is the list for each (e.g. '0', '0-1'). */
function pin(pids: number[], cpus: (pid: number) => string): void {
  for (const pid of pids) execFileSync('taskset', ['-a', '-p', '-c', cpus(pid), String(pid)], { stdio: 'ignore' });
}
const allCpus = (): string => `0-${os.cpus().length - 1}`;

beforeAll(async () => {
  swtpm = await SwtpmProcess.onSockets();
  client = await TpmClient.connect({ path: swtpm.dataPath! });
});
afterAll(async () => {
  client?.close();
  await swtpm?.stop();
  for (const d of dirs) removeDir(d);
});

describe('ring polling', () => {
  it('backend: takes the guest\'s next request from the ring without a notification, and sleeps again under CPU pressure', async () => {
    const dir = freshXenDir();
    dirs.push(dir);
    const dom0 = await Domain.create({ domid: 0, dir });
    const guest = child('ring-guest.mjs', [dir, '21', '0']);
    // Apart: an end whose peer shares its CPU stands aside instead of polling (the last test).
    const apart = [process.pid, guest.pid, swtpm.proc.pid!];
    pin(apart, (pid) => (pid === process.pid ? '0' : '1'));
    let contended = false;
    try {
      const { offer } = (await guest.next()) as { offer: { frontDomid: number; refs: number[]; port: number } };
      const ch = new RingChannel(dom0, {
        ...offer,
        target: { execute: (c) => client.transmit(c), cancel: () => {} },
        onFatal: () => {},
        pollUs: 5000,
        pollContended: () => contended,
      });
      const command = Buffer.from(tpm2.getRandom(8)).toString('hex');
      guest.send({ kind: 'run', count: 200, command });
      expect(await guest.next()).toEqual({ kind: 'ran', bad: 0 });
      // The guest sleeps between answers (its poll is off), so its next request follows our answer by a
      // wake-up: well inside the 5 ms window, most of the time even on a loaded machine.
      expect(ch.polled).toBeGreaterThan(50);
      // Another channel of this process with a request running (its manager answer still to come):
      // polling would hold that up, so the requests arrive by notification meanwhile.
      const other = await Domain.create({ domid: 23, dir });
      const otherFront = new RingFront(other, 0, { pollUs: 0 });
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const busy = new RingChannel(dom0, {
        frontDomid: 23,
        refs: [...otherFront.refs],
        port: otherFront.port,
        target: { execute: async (c) => (await gate, client.transmit(c)), cancel: () => {} },
        onFatal: () => {},
        pollUs: 5000,
        pollContended: () => false,
      });
      const held = otherFront.transmit(tpm2.getRandom(8));
      const polledBefore = ch.polled;
      guest.send({ kind: 'run', count: 50, command });
      expect(await guest.next()).toEqual({ kind: 'ran', bad: 0 });
      expect(ch.polled).toBe(polledBefore);
      release();
      expect(rc(await held)).toBe(0);
      busy.close();
      await otherFront.close();
      await other.destroy();
      // Standing down: every request still arrives, by notification, and the port is left unmasked.
      contended = true;
      const before = ch.polled;
      guest.send({ kind: 'run', count: 50, command });
      expect(await guest.next()).toEqual({ kind: 'ran', bad: 0 });
      expect(ch.polled).toBe(before);
      await sleep(5);
      expect(dom0.evtchn.status(ch.port).masked).toBe(false);
      ch.close();
    } finally {
      pin(apart, allCpus);
      await guest.stop();
      await dom0.destroy();
    }
  });

  it('frontend: a lone command\'s answer is taken from the ring before transmit() returns, and by notification under CPU pressure', async () => {
    const dir = freshXenDir();
    dirs.push(dir);
    const backend = child('ring-backend.mjs', [dir, swtpm.dataPath!]);
    const apart = [process.pid, backend.pid, swtpm.proc.pid!];
    pin(apart, (pid) => (pid === process.pid ? '0' : '1'));
    // The child holds swtpm's data socket now; ours would interleave with it.
    client.close();
    let contended = false;
    const dom = await Domain.create({ domid: 22, dir });
    try {
      expect((await backend.next()).kind).toBe('ready');
      const front = new RingFront(dom, 0, { pollUs: 5000, contended: () => contended });
      backend.send({ kind: 'offer', offer: { frontDomid: 22, refs: [...front.refs], port: front.port } });
      expect((await backend.next()).kind).toBe('connected');
      // Polled: the answer was on the ring when transmit() gave back its promise (a notification would
      // only be delivered on a later turn of the loop).
      let answeredInCall = 0;
      for (let i = 0; i < 200; i++) {
        const before = front.polled;
        const p = front.transmit(tpm2.getRandom(8));
        if (front.polled > before) answeredInCall++;
        expect(rc(await p)).toBe(0);
      }
      expect(answeredInCall).toBeGreaterThan(50);
      // Another front of this process waiting for its answer: a poll would hold it up, so none.
      const other = new RingFront(dom, 0, { pollUs: 0 });
      const waiting = other.transmit(tpm2.getRandom(8)); // nobody serves it: it waits until closed
      const polledBefore = front.polled;
      for (let i = 0; i < 20; i++) expect(rc(await front.transmit(tpm2.getRandom(8)))).toBe(0);
      expect(front.polled).toBe(polledBefore);
      await other.close();
      await expect(waiting).rejects.toThrow(/closed/);
      contended = true;
      for (let i = 0; i < 50; i++) expect(rc(await front.transmit(tpm2.getRandom(8)))).toBe(0);
      expect(front.polled).toBe(polledBefore);
      await sleep(5);
      expect(dom.evtchn.status(front.port).masked).toBe(false);
      await front.close();
    } finally {
      pin(apart, allCpus);
      await backend.stop();
      await dom.destroy();
      client = await TpmClient.connect({ path: swtpm.dataPath! });
    }
  });

  it.each(['ring', 'v2'] as const)('%s: an end whose peer waits for its CPU stands aside instead of spinning (both on one vCPU), and keeps polling when they are apart', async (protocol) => {
    const dir = freshXenDir();
    dirs.push(dir);
    const backend = child('ring-backend.mjs', [dir, swtpm.dataPath!]);
    client.close();
    const dom = await Domain.create({ domid: 24, dir });
    const pids = [process.pid, backend.pid, swtpm.proc.pid!];
    const stats = async (): Promise<{ polled: number; stoodAside: number }> => {
      backend.send({ kind: 'stats' });
      const m = (await backend.next()) as { polled?: number; stoodAside: number };
      return { polled: m.polled ?? 0, stoodAside: m.stoodAside };
    };
    // The v2 ends keep no count of answers their polls found.
    const frontPolled = (f: RingFront | V2Front): number => (f instanceof RingFront ? f.polled : 0);
    try {
      expect((await backend.next()).kind).toBe('ready');
      // 5 ms windows and no stand-down under pressure: on one vCPU, a poll that kept spinning would hold
      // its peer off for the whole window, each way.
      const front = protocol === 'ring' ? new RingFront(dom, 0, { pollUs: 5000, contended: () => false }) : new V2Front(dom, 0, { pollUs: 5000, contended: () => false });
      backend.send({ kind: 'offer', offer: { frontDomid: 24, refs: [...front.refs], port: front.port }, poll: true, protocol });
      expect((await backend.next()).kind).toBe('connected');
      const run = async (n: number): Promise<void> => {
        for (let i = 0; i < n; i++) expect(rc(await front.transmit(tpm2.getRandom(8)))).toBe(0);
      };
      // Apart: each end finds the other elsewhere, so neither stands aside and the polls find the work.
      pin(pids, (pid) => (pid === process.pid ? '0' : '1'));
      await run(20);
      let back = await stats();
      const before = { front: front.stoodAside, back: back.stoodAside, polled: frontPolled(front) + back.polled };
      await run(200);
      back = await stats();
      expect(front.stoodAside).toBe(before.front);
      expect(back.stoodAside).toBe(before.back);
      if (protocol === 'ring') expect(frontPolled(front) + back.polled - before.polled).toBeGreaterThan(50);
      // One vCPU for all: the ends see each other waiting for it and sleep on the event channel instead.
      pin(pids, () => '0');
      await run(20);
      const shared = { front: front.stoodAside, back: (await stats()).stoodAside };
      await run(200);
      back = await stats();
      expect(front.stoodAside - shared.front + back.stoodAside - shared.back).toBeGreaterThan(100);
      await front.close();
    } finally {
      pin(pids, allCpus);
      await backend.stop();
      await dom.destroy();
      client = await TpmClient.connect({ path: swtpm.dataPath! });
    }
  });
});
