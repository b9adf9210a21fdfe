// The xenbus handshake between a frontend in a guest (dom5's socket) and a backend in dom0, through a
// real xenstored: libxl's device directories, connect, close, resume, and failure paths.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { XsClient } from '../../src/xenstore/client.js';
import { backendPath, frontendPath, ignoreEnoent, readState, switchState, vtpmDevice, waitForState, XenbusError, XenbusState, type VtpmDevice } from '../../src/xenstore/xenbus.js';
import { backendConnected, backendInitWait, parseFrontendRing, type FrontendInfo } from '../../src/xenstore/xenbus-backend.js';
import { NOTICE_GRACE_MS, followBackend, frontendClose, frontendConnect, frontendReconnect, frontendResume } from '../../src/xenstore/xenbus-frontend.js';
import { XsType } from '../../src/xenstore/wire.js';
import { writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { connectClient, errnoOf, startDaemon, type Daemon } from './helpers.js';

let d: Daemon;
let dom0: XsClient;
let fe: XsClient;
let other: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  dom0 = await connectClient(d.socket);
  await dom0.introduce(5);
  await dom0.introduce(6);
  fe = await connectClient(d.domSocket(5));
  other = await connectClient(d.domSocket(6));
});
afterAll(async () => {
  for (const c of [fe, other, dom0]) await c?.close();
  await d?.stop();
});

// The backend's side, played here with the steps backend/device.ts takes (its own state machine needs
// a mapped ring; these tests are about the frontend steps and the xenstore traffic between the two).
async function backendAwaitFrontend(dev: VtpmDevice): Promise<FrontendInfo> {
  const state = await waitForState(dom0, dev.frontend, (s) => s === XenbusState.Initialised || s === XenbusState.Connected, { timeoutMs: 10_000 });
  const [ring, port, v2] = await Promise.all(['ring-ref', 'event-channel', 'feature-protocol-v2'].map((k) => dom0.tryRead(`${dev.frontend}/${k}`)));
  return parseFrontendRing(dev, state, ring, port, v2);
}

async function backendConnect(dev: VtpmDevice, attach: (fe: FrontendInfo) => Promise<void>): Promise<FrontendInfo> {
  await backendInitWait(dom0, dev);
  const info = await backendAwaitFrontend(dev);
  await attach(info);
  await backendConnected(dom0, dev);
  return info;
}

/** On frontend Closing: Closing, wait for Closed, detach, clear ready, back to InitWait. */
async function backendClose(dev: VtpmDevice, detach: () => Promise<void>): Promise<XenbusState> {
  await switchState(dom0, dev.backend, XenbusState.Closing);
  await waitForState(dom0, dev.frontend, (s) => s === XenbusState.Closed, { timeoutMs: 10_000 });
  await detach();
  await dom0.rm(`${dev.backend}/ready`).catch(ignoreEnoent);
  await switchState(dom0, dev.backend, XenbusState.InitWait);
  return XenbusState.InitWait;
}

describe('xenbus', () => {
  it('numbers states as enum xenbus_state and builds the device paths', () => {
    expect([XenbusState.Unknown, XenbusState.InitWait, XenbusState.Connected, XenbusState.Closed, XenbusState.Reconfigured]).toEqual([0, 2, 4, 6, 8]);
    expect(frontendPath(5, 0)).toBe('/local/domain/5/device/vtpm/0');
    expect(backendPath(0, 5, 0)).toBe('/local/domain/0/backend/vtpm/5/0');
  });

  it('writes the device directories as libxl does, with its permissions', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 0, uuid: '00000000-0000-4000-8000-000000000005' });
    expect(await dom0.getPerms(dev.frontend)).toEqual([{ domid: 5, access: 'n' }, { domid: 0, access: 'r' }]);
    expect(await dom0.getPerms(dev.backend)).toEqual([{ domid: 0, access: 'n' }, { domid: 5, access: 'r' }]);
    expect(await dom0.getPerms(`${dev.backend}/state`)).toEqual([{ domid: 0, access: 'n' }, { domid: 5, access: 'r' }]);
    const back = Object.fromEntries(await Promise.all((await dom0.directory(dev.backend)).map(async (k) => [k, await dom0.readString(`${dev.backend}/${k}`)])));
    expect(back).toEqual({
      frontend: '/local/domain/5/device/vtpm/0',
      'frontend-id': '5',
      online: '1',
      state: '1',
      handle: '0',
      uuid: '00000000-0000-4000-8000-000000000005',
      resume: 'False',
    });
    const front = Object.fromEntries(await Promise.all((await dom0.directory(dev.frontend)).map(async (k) => [k, await dom0.readString(`${dev.frontend}/${k}`)])));
    expect(front).toEqual({ backend: '/local/domain/0/backend/vtpm/5/0', 'backend-id': '0', state: '1', handle: '0' });
    expect(await dom0.readString('/libxl/5/device/vtpm/0/backend')).toBe(dev.backend);
    // the guest reads the backend, writes its own directory, and another guest sees neither
    expect(await fe.readString(`${dev.backend}/uuid`)).toBe('00000000-0000-4000-8000-000000000005');
    expect(await errnoOf(fe.write(`${dev.backend}/state`, '4'))).toBe('EACCES');
    await fe.write(`${dev.frontend}/scratch`, 'x');
    await fe.rm(`${dev.frontend}/scratch`);
    expect(await errnoOf(other.read(`${dev.frontend}/state`))).toBe('EACCES');
    expect(await errnoOf(other.read(`${dev.backend}/state`))).toBe('EACCES');
  });

  it('connects, closes and reconnects after a resume with a new ring', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 1 });
    const attached: FrontendInfo[] = [];
    let detached = 0;
    const back = backendConnect(dev, async (info) => void attached.push(info));
    await frontendConnect(fe, dev, { ringRef: 8, eventChannel: 3 }, { timeoutMs: 10_000 });
    await back;
    expect(attached).toEqual([{ ringRef: 8, eventChannel: 3, protocolV2: true, state: XenbusState.Initialised }]);
    expect(await readState(dom0, dev.backend)).toBe(XenbusState.Connected);
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Connected);
    expect(await dom0.readString(`${dev.backend}/ready`)).toBe('1');
    expect(await dom0.readString(`${dev.backend}/feature-protocol-v2`)).toBe('1');

    // close: frontend Closing → backend Closing → frontend Closed → backend back to InitWait
    const backendSide = (async () => {
      await waitForState(dom0, dev.frontend, (s) => s === XenbusState.Closing, { timeoutMs: 10_000 });
      return backendClose(dev, async () => void detached++);
    })();
    await frontendClose(fe, dev, { timeoutMs: 10_000 });
    expect(await backendSide).toBe(XenbusState.InitWait);
    expect(detached).toBe(1);
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Closed);
    expect(await dom0.exists(`${dev.backend}/ready`)).toBe(false);

    // a resumed frontend publishes a brand-new ring and event channel
    const back2 = backendAwaitFrontend(dev);
    const front2 = frontendResume(fe, dev, { ringRef: 9, eventChannel: 4 }, { timeoutMs: 10_000 });
    const info2 = await back2;
    expect(info2).toMatchObject({ ringRef: 9, eventChannel: 4, protocolV2: true });
    await switchState(dom0, dev.backend, XenbusState.Connected);
    await front2;
    expect(await readState(fe, dev.frontend)).toBe(XenbusState.Connected);
  });

  it("releases the ring once its Closed has left, before xenstored's answer to it", async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 7 });
    const back = backendConnect(dev, async () => {});
    await frontendConnect(fe, dev, { ringRef: 8, eventChannel: 3 }, { timeoutMs: 10_000 });
    await back;
    const order: string[] = [];
    // The guest's client, noting when xenstored answers its Closed.
    const client = new Proxy(fe, {
      get: (t, p) => {
        if (p === 'write') {
          return (path: string, value: string, tx?: number) => {
            const w = t.write(path, value, tx);
            if (path === `${dev.frontend}/state` && value === String(XenbusState.Closed)) void w.then(() => order.push('Closed answered'));
            return w;
          };
        }
        const v = Reflect.get(t, p, t) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
      },
    });
    // The backend's answer came by the ring (a suspend notice): no wait for its Closing.
    const answered = await frontendClose(client, dev, { timeoutMs: 10_000, answered: Promise.resolve(true), release: async () => void order.push('released') });
    expect(answered).toBe(true);
    expect(order).toEqual(['released', 'Closed answered']);
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Closed);
  });

  it("a close answered on the ring (the suspend notice) sends no WATCH and no read of the backend's state", async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 8 });
    const back = backendConnect(dev, async () => {});
    await frontendConnect(fe, dev, { ringRef: 8, eventChannel: 3 }, { timeoutMs: 10_000 });
    await back;
    const sent: string[] = [];
    fe.tap = (dir, packet) => {
      if (dir === 'out') sent.push(XsType[packet.readUInt32LE(0)]!);
    };
    try {
      expect(await frontendClose(fe, dev, { timeoutMs: 10_000, answered: Promise.resolve(true) })).toBe(true);
      await new Promise((r) => setTimeout(r, NOTICE_GRACE_MS + 100));
    } finally {
      fe.tap = null;
    }
    expect(sent).toEqual(['WRITE', 'WRITE']); // Closing, Closed
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Closed);
  });

  it('a close whose suspend notice is never answered goes on at the backend\'s Closing, read through xenstore', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 9 });
    const back = backendConnect(dev, async () => {});
    await frontendConnect(fe, dev, { ringRef: 8, eventChannel: 3 }, { timeoutMs: 10_000 });
    await back;
    const closing = waitForState(dom0, dev.frontend, (s) => s === XenbusState.Closing, { timeoutMs: 10_000 }).then(() => switchState(dom0, dev.backend, XenbusState.Closing));
    const t0 = performance.now();
    expect(await frontendClose(fe, dev, { timeoutMs: 10_000, answered: new Promise<boolean>(() => {}) })).toBe(true);
    await closing;
    expect(performance.now() - t0).toBeLessThan(5000);
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Closed);
  });

  it("resumes at the backend's signal on the new event channel, without reading its Connected back", async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 8 });
    const back = backendConnect(dev, async () => {});
    await frontendConnect(fe, dev, { ringRef: 8, eventChannel: 3 }, { timeoutMs: 10_000 });
    await back;
    // The backend is still Connected with the old ring in xenstore (stale for the resume) and never
    // writes again: only the signal, given here, says the new ring is served.
    await frontendReconnect(fe, dev, { ringRef: 9, eventChannel: 4 }, { timeoutMs: 1000, connected: Promise.resolve() });
    await waitForState(dom0, dev.frontend, (s) => s === XenbusState.Connected, { timeoutMs: 10_000 });
    expect(await dom0.readString(`${dev.frontend}/ring-ref`)).toBe('9');
  });

  it('after a signalled resume, an InitWait read before any Connected is stale: held back, and dropped once Connected comes', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 10 });
    // The backend signalled, but xenstored has not applied its Connected yet: our read says InitWait.
    await switchState(dom0, dev.backend, XenbusState.InitWait);
    const seen: XenbusState[] = [];
    const w = await followBackend(fe, dev, (s) => seen.push(s), { signalled: true, staleMs: 300 });
    await waitForState(fe, dev.backend, (s) => s === XenbusState.InitWait, { timeoutMs: 10_000 });
    await switchState(dom0, dev.backend, XenbusState.Connected);
    await waitForState(fe, dev.backend, (s) => s === XenbusState.Connected, { timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 500));
    expect(seen).toEqual([XenbusState.Connected]);
    // Once Connected was seen, InitWait is a reset (a restarted backend), passed on at once.
    await switchState(dom0, dev.backend, XenbusState.InitWait);
    for (let i = 0; i < 200 && seen.length < 2; i++) await new Promise((r) => setTimeout(r, 10));
    expect(seen).toEqual([XenbusState.Connected, XenbusState.InitWait]);
    await w.close();
  });

  it('after a signalled resume, an InitWait that stays past the bound is passed on (the backend was replaced); unsignalled at once', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 11 });
    await switchState(dom0, dev.backend, XenbusState.InitWait);
    const seen: Array<[XenbusState, number]> = [];
    const t0 = performance.now();
    const w = await followBackend(fe, dev, (s) => seen.push([s, performance.now() - t0]), { signalled: true, staleMs: 300 });
    for (let i = 0; i < 200 && !seen.length; i++) await new Promise((r) => setTimeout(r, 10));
    expect(seen.map(([s]) => s)).toEqual([XenbusState.InitWait]);
    expect(seen[0]![1]).toBeGreaterThanOrEqual(300);
    await w.close();
    const plain: XenbusState[] = [];
    const t1 = performance.now();
    const w2 = await followBackend(fe, dev, (s) => plain.push(s));
    for (let i = 0; i < 200 && !plain.length; i++) await new Promise((r) => setTimeout(r, 5));
    expect(plain).toEqual([XenbusState.InitWait]);
    expect(performance.now() - t1).toBeLessThan(300);
    await w2.close();
  });

  it('publishes in a transaction started beforehand, and redoes it in a new one when its commit conflicts', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 4 });
    await dom0.write(`${dev.backend}/feature-protocol-v2`, '1');
    const tx = fe.transactionStart();
    await tx;
    // Someone changes a key the transaction is about to write, after it started: its commit is EAGAIN.
    await dom0.write(`${dev.frontend}/ring-ref`, '77');
    const back = backendAwaitFrontend(dev);
    const front = frontendConnect(fe, dev, { ringRef: 21, eventChannel: 6 }, { timeoutMs: 10_000, tx });
    expect(await back).toEqual({ ringRef: 21, eventChannel: 6, protocolV2: true, state: XenbusState.Initialised });
    await switchState(dom0, dev.backend, XenbusState.Connected);
    await front;
    expect(await dom0.readString(`${dev.frontend}/ring-ref`)).toBe('21');
    expect(await waitForState(dom0, dev.frontend, (s) => s === XenbusState.Connected, { timeoutMs: 10_000 })).toBe(XenbusState.Connected);
  });

  it('waits through the registration event for a change made right after it, or much later', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 6 });
    const soon = waitForState(fe, dev.backend, (s) => s === XenbusState.InitWait, { timeoutMs: 10_000 });
    await switchState(dom0, dev.backend, XenbusState.InitWait);
    expect(await soon).toBe(XenbusState.InitWait);
    const later = waitForState(fe, dev.backend, (s) => s === XenbusState.Connected, { timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 50));
    await switchState(dom0, dev.backend, XenbusState.Initialised);
    await switchState(dom0, dev.backend, XenbusState.Connected);
    expect(await later).toBe(XenbusState.Connected);
  });

  it('stops waiting for a state when its signal aborts', async () => {
    const dev = vtpmDevice(5, 5);
    const stop = new AbortController();
    const waiting = waitForState(fe, dev.frontend, (s) => s === XenbusState.Connected, { timeoutMs: 10_000, signal: stop.signal }).catch((e: unknown) => e);
    stop.abort(new Error('not needed'));
    expect(((await waiting) as Error).message).toBe('not needed');
  });

  it('fails a frontend whose backend lacks feature-protocol-v2, writing the error node and Closing', async () => {
    const dev = await writeDeviceDirectories(dom0, { frontDomid: 5, backDomid: 0, devid: 2 });
    await switchState(dom0, dev.backend, XenbusState.Initialised);
    const err = await frontendConnect(fe, dev, { ringRef: 1, eventChannel: 1 }, { timeoutMs: 10_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(XenbusError);
    expect((err as XenbusError).code).toBe('XENBUS_PROTOCOL');
    expect(await readState(dom0, dev.frontend)).toBe(XenbusState.Closing);
    expect(await dom0.readString('/local/domain/5/error/device/vtpm/2/error')).toBe('22 vTPM protocol 2 required');
  });

  it('times out waiting for a state that never comes, and removes its watch', async () => {
    const dev = vtpmDevice(5, 3);
    const err = await waitForState(fe, dev.frontend, (s) => s === XenbusState.Connected, { timeoutMs: 200 }).catch((e: unknown) => e);
    expect((err as XenbusError).code).toBe('XENBUS_TIMEOUT');
    // the guest can still register its full watch quota, so nothing leaked
    const ws = [];
    for (let i = 0; i < 128; i++) ws.push(await fe.watch(`leak${i}`));
    for (const w of ws) await w.close();
  });
});
