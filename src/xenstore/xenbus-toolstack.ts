// Xenbus, toolstack role: what libxl does to add and remove a vTPM device (docs/protocols/xenbus.md,
// Directories).
import { randomUUID } from 'node:crypto';
import type { XsClient } from './client.js';
import { XenbusState, ignoreEnoent, vtpmDevice, type VtpmDevice } from './xenbus.js';

export interface DeviceDirectoryOptions {
  frontDomid: number;
  backDomid: number;
  devid: number;
  /** vTPM UUID written to the backend's `uuid` (random if absent, as libxl does). */
  uuid?: string;
  /** Additional keys for each side, e.g. {backend: {'pref_instance': '3'}}. */
  extra?: { frontend?: Record<string, string>; backend?: Record<string, string> };
}

/**
 * What libxl does to add a vTPM (docs/protocols/xenbus.md, Directories), in one transaction: the backend directory
 * [n<be>, r<fe>] with frontend, frontend-id, online=1, state=1, handle, uuid, resume=False; the
 * frontend directory [n<fe>, r<be>] with backend, backend-id, state=1, handle; and libxl's own copy
 * under /libxl/<fe>/device/vtpm/<devid>. Old contents of those directories are removed first.
 */
export async function writeDeviceDirectories(client: XsClient, o: DeviceDirectoryOptions): Promise<VtpmDevice> {
  const dev = vtpmDevice(o.frontDomid, o.devid, o.backDomid);
  const uuid = o.uuid ?? randomUUID();
  const libxl = `/libxl/${o.frontDomid}/device/vtpm/${o.devid}`;
  const back: Record<string, string> = {
    frontend: dev.frontend,
    'frontend-id': String(o.frontDomid),
    online: '1',
    state: String(XenbusState.Initialising),
    handle: String(o.devid),
    uuid,
    resume: 'False',
    ...o.extra?.backend,
  };
  const front: Record<string, string> = {
    backend: dev.backend,
    'backend-id': String(o.backDomid),
    state: String(XenbusState.Initialising),
    handle: String(o.devid),
    ...o.extra?.frontend,
  };
  await client.transaction(async (tx) => {
    for (const p of [dev.frontend, dev.backend, libxl]) await client.rm(p, tx).catch(ignoreEnoent);
    await client.mkdir(dev.frontend, tx);
    await client.setPerms(dev.frontend, [{ domid: o.frontDomid, access: 'n' }, { domid: o.backDomid, access: 'r' }], tx);
    await client.mkdir(dev.backend, tx);
    await client.setPerms(dev.backend, [{ domid: o.backDomid, access: 'n' }, { domid: o.frontDomid, access: 'r' }], tx);
    // keys created inside the directories inherit their permissions
    for (const [k, v] of Object.entries(front)) await client.write(`${dev.frontend}/${k}`, v, tx);
    for (const [k, v] of Object.entries(back)) await client.write(`${dev.backend}/${k}`, v, tx);
    await client.write(`${libxl}/frontend`, dev.frontend, tx);
    await client.write(`${libxl}/backend`, dev.backend, tx);
  });
  return dev;
}

/** Remove a device's directories (what the toolstack does after the device closed). */
export async function removeDeviceDirectories(client: XsClient, dev: VtpmDevice): Promise<void> {
  await client.transaction(async (tx) => {
    for (const p of [dev.frontend, dev.backend, `/libxl/${dev.frontDomid}/device/vtpm/${dev.devid}`]) {
      await client.rm(p, tx).catch(ignoreEnoent);
    }
  });
}

/**
 * The device as the toolstack wrote it: its backend is the domain the frontend directory's backend-id
 * names (dom0, or a vTPM stub domain); dom0 when the frontend directory is gone or unreadable.
 */
export async function deviceOf(client: XsClient, frontDomid: number, devid: number): Promise<VtpmDevice> {
  const id = await client.tryRead(`/local/domain/${frontDomid}/device/vtpm/${devid}/backend-id`).catch(() => undefined);
  const back = id !== undefined && /^[0-9]{1,5}$/.test(id) ? Number(id) : 0;
  return vtpmDevice(frontDomid, devid, back);
}
