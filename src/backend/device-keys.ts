// What a backend device (device.ts) reads from xenstore in one batch to attach, its time bounds, and which
// device holds each VM's vTPM in a backend process.
import type { XsClient } from '../xenstore/client.js';
import { readState, type XenbusState, type VtpmDevice } from '../xenstore/xenbus.js';
import { XS_FEATURE_RING } from '../xen/tpmif.js';
import type { VtpmProvider } from './provider.js';

/**
 * Which device holds each VM's vTPM, per provider (one per backend process). A VM's vTPM serves one
 * guest: a second device naming the same uuid (any toolstack may write one) would share its instance,
 * its completed-request table and its cancels, and detaching either would destroy it under the other.
 */
const claims = new WeakMap<VtpmProvider, Map<string, string>>();

export function claimsOf(p: VtpmProvider): Map<string, string> {
  let m = claims.get(p);
  if (!m) claims.set(p, (m = new Map()));
  return m;
}

/** Everything an attach reads from xenstore, read in one batch. */
export interface AttachKeys {
  own: XenbusState;
  ringRef: string | undefined;
  eventChannel: string | undefined;
  protocolV2: string | undefined;
  ring: string | undefined;
  uuid: string | undefined;
  version: string | undefined;
  resume: string | undefined;
}

/**
 * How long a suspending guest's in-flight command may still run before it is cancelled through libtpms
 * (Xen's tpmback used 30 s); VTPM_SUSPEND_BOUND_MS lowers it (tests).
 */
export function suspendBoundMs(): number {
  const v = Number(process.env.VTPM_SUSPEND_BOUND_MS);
  return Number.isFinite(v) && v > 0 ? v : 30_000;
}

/**
 * How long a suspended guest's vTPM (durable at the manager all along) stays loaded waiting for its
 * resume before it is released. VTPM_PARK_MS changes it (0: release at suspend).
 */
export function parkMs(): number {
  const raw = process.env.VTPM_PARK_MS;
  const v = Number(raw);
  return raw !== undefined && raw !== '' && Number.isFinite(v) && v >= 0 ? v : 60_000;
}

/** Everything an attach reads, in one batch. */
export function readAttachKeys(xs: XsClient, dev: VtpmDevice): Promise<AttachKeys> {
  const { frontend, backend } = dev;
  return Promise.all([
    readState(xs, backend),
    xs.tryRead(`${frontend}/ring-ref`),
    xs.tryRead(`${frontend}/event-channel`),
    xs.tryRead(`${frontend}/feature-protocol-v2`),
    xs.tryRead(`${frontend}/${XS_FEATURE_RING}`),
    xs.tryRead(`${backend}/uuid`),
    xs.tryRead(`${backend}/tpm-version`),
    xs.tryRead(`${backend}/resume`),
  ]).then(([own, ringRef, eventChannel, protocolV2, ring, uuid, version, resume]) => ({ own, ringRef, eventChannel, protocolV2, ring, uuid, version, resume }));
}
