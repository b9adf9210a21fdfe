// Xenbus, backend role: the steps the backend device's own state machine (backend/device.ts) takes:
// publish features and InitWait, check what the frontend published, then ready and Connected
// (docs/protocols/xenbus.md).
import type { XsClient } from './client.js';
import { quoteGuest } from '../util/log-escape.js';
import { XenbusError, XenbusState, switchState, type VtpmDevice } from './xenbus.js';

/** What the backend reads from the frontend directory before mapping the ring. */
export interface FrontendInfo {
  ringRef: number;
  eventChannel: number;
  /** feature-protocol-v2 = "1" was published. */
  protocolV2: boolean;
  /** The state the frontend was in when read (Initialised or Connected). */
  state: XenbusState;
}

/** Backend step 2: publish features (default feature-protocol-v2 = "1"), then switch to InitWait (pipelined, state last). */
export async function backendInitWait(
  client: XsClient,
  dev: VtpmDevice,
  features: Record<string, string> = { 'feature-protocol-v2': '1' },
): Promise<void> {
  await Promise.all([
    ...Object.entries(features).map(([k, v]) => client.write(`${dev.backend}/${k}`, v)),
    switchState(client, dev.backend, XenbusState.InitWait),
  ]);
}

/** Check the ring-ref, event-channel and feature-protocol-v2 values a frontend published (XENBUS_PROTOCOL if bad). */
export function parseFrontendRing(
  dev: VtpmDevice,
  state: XenbusState,
  ring: string | undefined,
  port: string | undefined,
  v2: string | undefined,
): FrontendInfo {
  const u32 = (s: string | undefined): number | undefined =>
    s !== undefined && /^[0-9]{1,10}$/.test(s) && Number(s) <= 0xffffffff ? Number(s) : undefined;
  const ringRef = u32(ring);
  const eventChannel = u32(port);
  if (ringRef === undefined || eventChannel === undefined) {
    const shown = (v: string | undefined): string => (v === undefined ? 'none' : quoteGuest(v));
    throw new XenbusError('XENBUS_PROTOCOL', `frontend ${dev.frontend} published ring-ref ${shown(ring)} event-channel ${shown(port)}`);
  }
  return { ringRef, eventChannel, protocolV2: v2 === '1', state };
}

/** Backend step 5 (second half) and 6: write ready = "1", then switch to Connected (pipelined, state last). */
export async function backendConnected(client: XsClient, dev: VtpmDevice): Promise<void> {
  await Promise.all([client.write(`${dev.backend}/ready`, '1'), switchState(client, dev.backend, XenbusState.Connected)]);
}
