// The toolstack's part of stub-domain mode (docs/multi-vm.md, stubdom): ask dom0's backend for the
// guest's vTPM domain before writing the device with that domain as its backend, as xl starts a
// vtpm stub domain before the guest that names it; and remove the request when the device is gone.
import { setTimeout as sleep } from 'node:timers/promises';
import type { XsClient } from '../xenstore/client.js';
import { ignoreEnoent } from '../xenstore/xenbus.js';
import { STUBDOM_ROOT, StubdomNodeState } from '../backend/stubdom.js';
import { CliError } from './errors.js';

export const stubdomNode = (fe: number, devid: number): string => `${STUBDOM_ROOT}/${fe}/${devid}`;

/** Write the request (one transaction) and wait for the backend's answer: the vTPM domain's domid. */
export async function requestStubdom(xs: XsClient, o: { fe: number; devid: number; vm: string; version: '2.0' | '1.2'; timeoutMs: number }): Promise<number> {
  const node = stubdomNode(o.fe, o.devid);
  await xs.transaction(async (tx) => {
    await xs.rm(node, tx).catch(ignoreEnoent);
    await xs.write(`${node}/uuid`, o.vm, tx);
    await xs.write(`${node}/tpm-version`, o.version, tx);
    await xs.write(`${node}/state`, String(StubdomNodeState.INITIALISING), tx);
  });
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    const [state, domid, error] = await Promise.all([xs.tryRead(`${node}/state`), xs.tryRead(`${node}/domid`), xs.tryRead(`${node}/error`)]);
    if (state === String(StubdomNodeState.CONNECTED) && domid !== undefined && /^[0-9]+$/.test(domid)) return Number(domid);
    if (state === String(StubdomNodeState.CLOSED)) throw new CliError('REFUSED', `the backend did not start a vTPM domain for dom${o.fe}: ${error ?? 'no reason given (see the backend log)'}`);
    if (state === undefined) throw new CliError('FAILED', `${node} vanished while the backend started the vTPM domain`);
    if (Date.now() > deadline) throw new CliError('FAILED', `the backend did not start a vTPM domain for dom${o.fe} in ${o.timeoutMs} ms; is it running? see \`vtpm host status\``);
    await sleep(10);
  }
}

/** Remove the request: the backend stops the domain (state saved) and releases its domid; wait for that. */
export async function removeStubdom(xs: XsClient, fe: number, devid: number, timeoutMs = 15_000): Promise<void> {
  const node = stubdomNode(fe, devid);
  const domid = await xs.tryRead(`${node}/domid`);
  await xs.rm(node).catch(ignoreEnoent);
  if (domid === undefined || !/^[0-9]+$/.test(domid)) return;
  const deadline = Date.now() + timeoutMs;
  while ((await xs.isDomainIntroduced(Number(domid))) && Date.now() < deadline) await sleep(20);
}
