// Busy-waiting after a reply on the QEMU endpoint (docs/qemu.md, "Where the time goes"): after each
// control reply and each data response the endpoint stays on the CPU for its poll window, then stops;
// a peer that takes longer than the window to follow closes it, so an idle VM costs no CPU.
// The endpoint runs in this process on a real libtpms instance, QEMU's side in a child process
// (test/helpers/qemu-peer.mjs); the window is widened to 100 ms (and told the CPUs are free) so the
// spin is measurable: as event-loop busy time (wall clock, so a loaded machine cannot hide it) and,
// for the idle stretch after it, as CPU time too. A spin rightly gives way when the test process has
// other ready work (the test runner's own messages, on a busy machine): such a spin must say so
// ('other'); one that ran out its budget must have lasted the window.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import readline from 'node:readline';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { spinReadable } from '../../native/busy-poll.js';
import { closeFd, socketPair } from '../../native/unix-rights.js';
import { QemuEndpoint } from '../../src/backend/qemu-endpoint.js';
import { TpmHost } from '../../src/tpm/host.js';
import { DirStateStore } from '../../src/tpm/dir-store.js';
import { PollWindow } from '../../src/xen/index.js';
import { ROOT } from '../helpers/child.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const WINDOW_MS = 100;
/** The peer reports each reply this late, and then pauses this long: together past 4 windows. */
const REPORT_MS = 250;
const PAUSE_MS = 300;
const cpuMs = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};
/** Milliseconds the event loop was not waiting for events since `from`. */
const busyMs = (from: EventLoopUtilization): number => performance.eventLoopUtilization(from).active;
const elu = (): EventLoopUtilization => performance.eventLoopUtilization();

const work = tempDir('qpoll');
const host = new TpmHost();
let ep: QemuEndpoint;
let windows: PollWindow[] = [];
let store: DirStateStore;

beforeAll(async () => {
  fs.mkdirSync(join(work, 'state'));
  store = new DirStateStore(join(work, 'state'));
  const vtpm = await host.create({ instance: 1, version: '2.0', store, powerOn: false });
  ep = await QemuEndpoint.listen({
    path: join(work, 'ctrl.sock'),
    vtpm,
    log: () => {},
    pollWindow: () => {
      const w = new PollWindow(WINDOW_MS * 1000, () => false);
      windows.push(w);
      return w;
    },
  });
});

/** QEMU's side in its own process: ask() sends one request line and resolves with the reply's hex. */
class Peer {
  readonly #proc: ChildProcess;
  readonly #lines: string[] = [];
  #waiter: (() => void) | null = null;
  constructor(ctrlPath: string) {
    // Replies are reported late: a quick report would be other work for this process's loop, which
    // the spin (rightly) gives way to.
    this.#proc = spawn(process.execPath, [join(ROOT, 'test/helpers/qemu-peer.mjs'), ctrlPath, String(REPORT_MS)], { stdio: ['pipe', 'pipe', 'inherit'] });
    readline.createInterface({ input: this.#proc.stdout! }).on('line', (l) => {
      this.#lines.push(l);
      this.#waiter?.();
    });
  }
  async ask(line: string): Promise<string> {
    this.#proc.stdin!.write(line + '\n');
    const end = Date.now() + 10_000;
    while (this.#lines.length === 0) {
      if (Date.now() > end) throw new Error(`no reply to ${line}`);
      await new Promise<void>((r) => {
        this.#waiter = r;
        setTimeout(r, 100);
      });
    }
    return this.#lines.shift()!;
  }
  async close(): Promise<void> {
    const exited = new Promise((r) => this.#proc.once('exit', r));
    this.#proc.stdin!.end();
    await exited;
  }
}

/** The window spun after the reply: for all of its budget (and the loop was busy that long), or until other work was ready. */
function expectOneWindow(w: PollWindow, busy: number): void {
  expect(w.lastSpin).not.toBeNull();
  const { end, us } = w.lastSpin!;
  expect(['timeout', 'other']).toContain(end);
  if (end === 'timeout') {
    expect(us).toBeGreaterThanOrEqual(WINDOW_MS * 1000);
    expect(busy).toBeGreaterThanOrEqual(WINDOW_MS * 0.9);
  }
  w.lastSpin = null;
}

afterAll(async () => {
  await ep?.close();
  await host.destroyAll();
  store?.close(); // no spare refill under the removal
  removeDir(work);
});

describe('spinReadable', () => {
  it('ends at once when the socket has data, after the budget when nothing comes, and gives way to other ready work', async () => {
    await sleep(50); // whatever the test runner left ready in the event loop is handled first
    const [a, b] = socketPair();
    fs.writeSync(b, Buffer.from('x'));
    expect(spinReadable(a, 1_000_000)).toBe('readable');
    const [c, d] = socketPair();
    let t0 = performance.now();
    expect(spinReadable(c, 20_000)).toBe('timeout');
    const took = performance.now() - t0;
    expect(took).toBeGreaterThanOrEqual(20);
    expect(took).toBeLessThan(1000);
    // Another socket the event loop reads becomes ready: the spin on `c` gives way within its budget.
    const [e, f] = socketPair();
    const watched = new net.Socket({ fd: e, readable: true, writable: false });
    watched.on('data', () => {});
    await sleep(10);
    fs.writeSync(f, Buffer.from('y'));
    t0 = performance.now();
    expect(spinReadable(c, 1_000_000)).toBe('other');
    expect(performance.now() - t0).toBeLessThan(500);
    watched.destroy();
    for (const fd of [a, b, d, f]) closeFd(fd);
    closeFd(c);
  });
});

describe('QEMU endpoint poll window', () => {
  it('a control reply is followed by one window of spinning, then nothing; a slow client closes the window', async () => {
    windows = [];
    const peer = new Peer(ep.path);
    await sleep(100);
    let e = elu();
    expect(await peer.ask('ctrl 00000001 8')).toBe('0000000000007fef');
    const first = busyMs(e);
    e = elu();
    const t = cpuMs();
    await sleep(PAUSE_MS);
    // The reply went out and the endpoint stayed busy for the window, then went idle.
    expectOneWindow(windows[0]!, first);
    expect(busyMs(e)).toBeLessThan(WINDOW_MS * 0.5);
    expect(cpuMs() - t).toBeLessThan(WINDOW_MS * 0.5);
    // That client took REPORT_MS + PAUSE_MS to follow up, over 4 windows: no spin after this reply.
    e = elu();
    expect(await peer.ask('ctrl 00000001 8')).toBe('0000000000007fef');
    expect(busyMs(e)).toBeLessThan(WINDOW_MS * 0.5);
    expect(windows[0]!.lastSpin).toBeNull();
    expect(windows).toHaveLength(1);
    await peer.close();
  });

  it('a data response is followed by one window of spinning, then the endpoint is idle', async () => {
    windows = [];
    const peer = new Peer(ep.path);
    expect(await peer.ask('datafd')).toBe('00000000');
    expect(await peer.ask('ctrl 0000000200000000 4')).toBe('00000000'); // INIT
    await sleep(PAUSE_MS); // the control window is over
    let e = elu();
    expect(await peer.ask('data 80010000000c000001440000')).toBe('80010000000a00000000'); // Startup(CLEAR)
    const first = busyMs(e);
    e = elu();
    const t = cpuMs();
    await sleep(PAUSE_MS);
    expectOneWindow(windows[1]!, first);
    expect(busyMs(e)).toBeLessThan(WINDOW_MS * 0.5);
    expect(cpuMs() - t).toBeLessThan(WINDOW_MS * 0.5);
    // A control window and a data window, one each.
    expect(windows).toHaveLength(2);
    await peer.close();
  });
});
