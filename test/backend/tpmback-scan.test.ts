// The backend's device scan (src/backend/tpmback.ts): a toolstack's device transaction fires one watch
// event per key it wrote, and every event used to queue a rescan of every frontend, so attaching N
// devices cost O(N²) XS_DIRECTORY round trips that went on long after the last attach (and under a
// guest's commands). A real xenstored and a real dom0 here; the devices' guests never connect.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { startDaemon, type Daemon } from '../xenstore/helpers.js';
import { freshXenDir } from '../helpers/child.js';
import { removeDir } from '../helpers/temp.js';
import { Domain } from '../../src/xen/index.js';
import { connect, type XsClient } from '../../src/xenstore/client.js';
import { XsType } from '../../src/xenstore/wire.js';
import { writeDeviceDirectories } from '../../src/xenstore/xenbus-toolstack.js';
import { Backend, BACKEND_ROOT } from '../../src/backend/tpmback.js';
import type { VtpmProvider } from '../../src/backend/provider.js';

const N = 24;
let daemon: Daemon;
let xenDir: string;
let toolstack: XsClient;

beforeAll(async () => {
  daemon = await startDaemon();
  xenDir = freshXenDir();
  toolstack = await connect(daemon.socket);
});
afterAll(async () => {
  await toolstack?.close();
  await daemon?.stop();
  if (xenDir) removeDir(xenDir);
});

/** No guest ever connects here, so no vTPM is ever opened: a call is a test failure. */
const noVtpms: VtpmProvider = {
  open: () => Promise.reject(new Error('no vTPM expected in this test')),
  release: () => Promise.reject(new Error('no vTPM expected in this test')),
};

describe('backend device scan', () => {
  it(`picks up ${N} devices with O(N) directory reads, and reads nothing once they are all found`, async () => {
    const log: string[] = [];
    const backend = await Backend.start({ xenDir, xenstoredSocket: daemon.socket, vtpms: noVtpms, log: (l) => log.push(l) });
    const dirs: string[] = [];
    backend.xs.tap = (dir, packet) => {
      // xs_wire header: type u32, req_id u32, tx_id u32, len u32, then the path NUL-terminated.
      if (dir === 'out' && packet.readUInt32LE(0) === XsType.DIRECTORY) dirs.push(packet.subarray(16, packet.indexOf(0, 16)).toString());
    };
    try {
      for (let i = 0; i < N; i++) {
        const domid = 100 + i;
        await toolstack.introduce(domid);
        await writeDeviceDirectories(toolstack, { frontDomid: domid, backDomid: 0, devid: 0, uuid: randomUUID(), extra: { backend: { 'tpm-version': '2.0' } } });
      }
      const deadline = Date.now() + 20_000;
      while (backend.devices.length < N && Date.now() < deadline) await sleep(20);
      expect(backend.devices.length).toBe(N);
      const found = dirs.length;
      await sleep(500);
      // Nothing left queued once every device is driven.
      expect(dirs.length).toBe(found);
      const scans = dirs.filter((d) => d === BACKEND_ROOT || d.startsWith(`${BACKEND_ROOT}/`));
      // One event burst per device's transaction: at most a couple of reads of its frontend's
      // directory each (the old rescan-per-event read ~10·N²/2 here).
      expect(scans.length, scans.slice(0, 10).join('\n')).toBeLessThanOrEqual(3 * N);
      expect(log.filter((l) => l.startsWith('scan:'))).toEqual([]);
    } finally {
      await backend.stop();
    }
  }, 60_000);
});
