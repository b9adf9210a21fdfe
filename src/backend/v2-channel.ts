// The backend role of the tpmif v2 shared page (docs/protocols/tpmif.md), as mini-os tpmback and the Xen 4.3+
// vtpm stub domain play it against Linux xen-tpmfront: one command at a time; the frontend writes
// SUBMIT or CANCEL, we write only IDLE or FINISH, always state last and then notify.
//
// After publishing an answer the channel may poll the page for the guest's next SUBMIT for a short,
// adaptive window (src/xen/poll.ts), its port masked so the guest's notification costs no wake-up. The
// poll gives way as soon as another guest's port is pending, and a SUBMIT it finds is run on a later
// turn of the loop, so one busy guest cannot keep the backend from its other work.
import { PollWindow, StandAside, spinUntil, type Domain, type GrantMapping } from '../xen/index.js';
import {
  TPMIF_STATE_CANCEL,
  TPMIF_STATE_FINISH,
  TPMIF_STATE_IDLE,
  TPMIF_STATE_SUBMIT,
  decodeV2Header,
  encodeV2ResponseLength,
  setV2State,
  v2DataOffset,
  v2State,
} from '../xen/tpmif.js';
import { failureResponse } from '../tpm/error-response.js';
import type { Channel, ChannelOptions } from './channel.js';
import { RingEvent } from './capture.js';

const PAGE = 4096;
const MAX_LOCALITY = 4;
const TPM2_CC_GetCapability = 0x17a;
const TPM_CAP_TPM_PROPERTIES = 6;
const TPM_PT_MAX_COMMAND_SIZE = 0x11e;
const TPM_PT_MAX_RESPONSE_SIZE = 0x11f;

/**
 * A TPM 2.0 GetCapability(TPM_PROPERTIES) answer seen through the page must not promise more than the
 * page carries: MAX_COMMAND_SIZE and MAX_RESPONSE_SIZE are lowered to `max` in a copy (libtpms says
 * 4096, its buffer). Anything else, or a response too short to hold what it claims, passes unchanged.
 */
export function clampCapability(command: Uint8Array, response: Uint8Array, max: number): Uint8Array {
  if (command.length < 10 || response.length < 19) return response;
  const c = new DataView(command.buffer, command.byteOffset, command.byteLength);
  const r = new DataView(response.buffer, response.byteOffset, response.byteLength);
  if (c.getUint16(0) !== 0x8001 || c.getUint32(6) !== TPM2_CC_GetCapability) return response;
  if (r.getUint16(0) !== 0x8001 || r.getUint32(6) !== 0 || r.getUint32(11) !== TPM_CAP_TPM_PROPERTIES) return response;
  const count = r.getUint32(15);
  let out: Uint8Array | null = null;
  for (let i = 0, off = 19; i < count && off + 8 <= response.length; i++, off += 8) {
    const property = r.getUint32(off);
    if ((property === TPM_PT_MAX_COMMAND_SIZE || property === TPM_PT_MAX_RESPONSE_SIZE) && r.getUint32(off + 4) > max) {
      out ??= new Uint8Array(response); // a copy (a Buffer's slice() would be a view)
      new DataView(out.buffer, out.byteOffset, out.byteLength).setUint32(off + 4, max);
    }
  }
  return out ?? response;
}

export class V2Channel implements Channel {
  readonly protocol = 'v2' as const;
  readonly frontDomid: number;
  readonly #dom: Domain;
  readonly #map: GrantMapping;
  readonly #page: Uint8Array;
  readonly #port: number;
  readonly #opts: ChannelOptions;
  #busy: Promise<void> | null = null;
  #closed = false;
  readonly #poll: PollWindow;
  /** Waits that stood aside (slept at once) because the other end waited for our CPU. */
  get stoodAside(): number {
    return this.#peer.stoodAside;
  }
  readonly #peer = new StandAside(() => this.#dom.evtchn.sharesCpu(this.#port));
  commands = 0;

  constructor(dom: Domain, opts: ChannelOptions) {
    if (opts.refs.length !== 1) throw new Error(`v2 takes exactly one ring-ref, got ${opts.refs.length}`);
    this.#dom = dom;
    this.#opts = opts;
    this.frontDomid = opts.frontDomid;
    this.#poll = new PollWindow(opts.pollUs, opts.pollContended);
    this.#map = dom.mapper.map(opts.frontDomid, opts.refs[0]!);
    this.#page = new Uint8Array(this.#map.buffer);
    try {
      this.#port = dom.evtchn.bindInterdomain(opts.frontDomid, opts.port);
    } catch (err) {
      this.#map.unmap();
      throw err;
    }
    dom.evtchn.on(this.#port, () => this.#onEvent());
  }

  /** Our local event-channel port bound to the frontend's. */
  get port(): number {
    return this.#port;
  }

  #state(): number {
    return v2State(this.#page);
  }

  #setStateAndNotify(state: number): void {
    // Everything else on the page is written before the state; the Atomics store orders it.
    setV2State(this.#page, state);
    this.#dom.evtchn.send(this.#port);
  }

  #onEvent(): void {
    if (this.#closed) return;
    // Whatever we handle now, the next notification (a CANCEL while the command runs) must wake us.
    this.#dom.evtchn.unmask(this.#port);
    const state = this.#state();
    if (state === TPMIF_STATE_CANCEL) {
      this.#opts.tap?.(RingEvent.V2_CANCEL);
      // A running command completes (FINISH) or is cut short by the TPM; an idle device says IDLE.
      if (this.#busy) this.#opts.target.cancel();
      else this.#setStateAndNotify(TPMIF_STATE_IDLE);
      return;
    }
    if (state !== TPMIF_STATE_SUBMIT || this.#busy) return;
    // One clock read for the poll window and a capture's SUBMIT record.
    const now = performance.now();
    this.#poll.arrived(now);

    // Private copy of everything before validating: the guest may change the page under us.
    const { length, nrExtraPages: nrExtra, locality } = decodeV2Header(this.#page);
    const offset = v2DataOffset(nrExtra);
    if (nrExtra !== 0) return this.#fatal(`v2 page names ${nrExtra} extra pages; only single-page devices exist`);
    if (length > PAGE - offset) return this.#fatal(`v2 request length ${length} exceeds ${PAGE - offset} bytes`);
    if (locality > MAX_LOCALITY) return this.#fatal(`v2 request locality ${locality} is not 0..4`);
    const command = this.#page.slice(offset, offset + length);
    this.#opts.tap?.(RingEvent.V2_SUBMIT, locality, 0, length, undefined, now);
    this.#busy = this.#run(command, locality, offset);
  }

  async #run(command: Uint8Array, locality: number, offset: number): Promise<void> {
    let response: Uint8Array;
    try {
      response = await this.#opts.target.execute(command, { locality });
    } catch (err) {
      this.#opts.log?.(`dom${this.frontDomid}: vTPM failed: ${(err as Error).message}`);
      response = failureResponse(command);
    }
    this.commands++;
    if (this.#closed) return;
    if (response.length > PAGE - offset) {
      this.#opts.log?.(`dom${this.frontDomid}: response of ${response.length} bytes does not fit the page`);
      response = failureResponse(command);
    }
    response = clampCapability(command, response, PAGE - offset);
    this.#page.set(response, offset);
    encodeV2ResponseLength(this.#page, response.length);
    this.#busy = null;
    const budget = this.#poll.budgetUs;
    // Masked before FINISH is visible, so the guest's next SUBMIT cannot cost it a wake-up mid-poll.
    if (budget > 0) this.#dom.evtchn.mask(this.#port);
    this.#setStateAndNotify(TPMIF_STATE_FINISH);
    const answered = performance.now();
    this.#opts.tap?.(RingEvent.V2_FINISH, 0, 0, response.length, undefined, answered);
    this.#poll.answered(answered);
    if (budget > 0 && this.#pollNext(budget)) return;
    // A SUBMIT may have been missed while busy only if the frontend broke the one-at-a-time rule;
    // re-check anyway so a coalesced notification is never lost.
    if (this.#state() === TPMIF_STATE_SUBMIT) this.#onEvent();
  }

  /** Watch the page for the guest's next command; true if one came (it runs on a later turn). */
  #pollNext(budget: number): boolean {
    const next = (): boolean => {
      const s = this.#state();
      return s === TPMIF_STATE_SUBMIT || s === TPMIF_STATE_CANCEL;
    };
    this.#peer.waited = false;
    if (spinUntil(next, budget, () => this.#dom.evtchn.otherPendingSome(this.#port), this.#peer)) {
      this.#dom.evtchn.consume(this.#port);
      setImmediate(() => this.#onEvent());
      return true;
    }
    // Nothing yet: sleep on the event channel again. unmask() delivers a SUBMIT that raced this.
    this.#dom.evtchn.resting(this.#port, this.#peer.waited);
    this.#dom.evtchn.unmask(this.#port);
    return false;
  }

  #fatal(reason: string): void {
    this.close();
    this.#opts.onFatal(reason, 'v2_request');
  }

  /** Resolves once no command is running (the response has been published). */
  async drain(): Promise<void> {
    while (this.#busy) await this.#busy;
  }

  /** Unbind and unmap; a running command's response is dropped (the device is going away). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#dom.evtchn.close(this.#port);
    this.#map.unmap();
  }
}
