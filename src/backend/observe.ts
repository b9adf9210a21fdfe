// What the backend reports about each guest's commands: the metrics (src/util/metrics.ts) and, when
// the toolstack asked for one, the capture (capture.ts). A guest's vTPM target is wrapped once, where
// its channel or QEMU endpoint is opened, so every transport is measured at the same point: from a
// command reaching the vTPM to its answer being ready (durable, on the ring).
import type { CommandOutcome, PendingCount, Transport } from '../util/metrics.js';
import { metricsSink, since, type MetricsSink } from '../util/metrics-sink.js';
import { commandName } from '../tpm/command-names.js';
import { responseCode } from '../tpm/wire.js';
import type { OnceRequest, VtpmTarget } from '../tpm/vtpm.js';
import { GuestCapture, type XsCaptureRouter } from './capture.js';
import type { XsClient } from '../xenstore/client.js';

export interface GuestLabels {
  /** '' for a QEMU endpoint (no domain); its vm tells it apart. */
  domid: string;
  vm: string;
  transport: Transport;
}

const OUTCOMES: readonly CommandOutcome[] = ['success', 'tpm_error', 'failure'];

export class GuestObserver {
  readonly labels: GuestLabels;
  capture: GuestCapture | null;
  /** Pending counts by command name, one per outcome (OUTCOMES order), so a command costs no label lookup. */
  readonly #counts = new Map<string, PendingCount[]>();
  readonly #m: MetricsSink | null = metricsSink();
  readonly #duration;

  constructor(labels: GuestLabels, capture: GuestCapture | null = null) {
    this.labels = labels;
    this.capture = capture;
    this.#duration = this.#m?.backendMetrics().duration.labels(labels.transport, labels.domid, labels.vm);
  }

  /** One command answered (`response` null: no TPM answer, the backend made up a failure). */
  done(command: Uint8Array, response: Uint8Array | null, t0: number): void {
    // One clock read for both the capture's response stamp and the histogram.
    const t1 = performance.now();
    this.capture?.command(command, response, t0, t1);
    const m = this.#m;
    if (!m) return;
    const rc = response === null ? -1 : responseCode(response);
    const outcome = response === null ? 2 : rc === 0 ? 0 : 1;
    const name = commandName(command);
    let counts = this.#counts.get(name);
    if (!counts) {
      const l = this.labels;
      this.#counts.set(name, (counts = OUTCOMES.map((rcLabel) => m.commandCount({ domid: l.domid, vm: l.vm, transport: l.transport, command: name, rc: rcLabel }))));
    }
    counts[outcome]!.n++;
    this.#duration?.observe((t1 - t0) / 1000);
    if (outcome !== 0) m.guestError(this.labels.domid, this.labels.vm, OUTCOMES[outcome]!);
  }

  /** The guest was cut off (`reason` from a fixed set). */
  cutOff(reason: string): void {
    this.#m?.backendMetrics().cutOff.inc({ reason });
    this.#m?.guestError(this.labels.domid, this.labels.vm, `cut_off_${reason}`);
  }
}

/** `target` with every command reported to `obs`. */
export function observeTarget(target: VtpmTarget, obs: GuestObserver): VtpmTarget {
  return {
    execute: observeExecute((command, opts) => target.execute(command, opts), obs),
    cancel: () => target.cancel(),
    ...(target.completed ? { completed: (id: bigint) => target.completed!(id) } : {}),
    ...(target.checkpoint ? { checkpoint: () => target.checkpoint!() } : {}),
    ...(target.executeGroup
      ? {
          executeGroup: (first, more, status) => {
            // Each request is timed from when it joined the group to the group's durable answer.
            const joined: Array<{ r: OnceRequest; t0: number }> = [{ r: first, t0: performance.now() }];
            const report = (responses: Uint8Array[] | null): void => joined.forEach((j, i) => obs.done(j.r.command, responses?.[i] ?? null, j.t0));
            const joining = (joins: (command: Uint8Array) => boolean): OnceRequest | undefined => {
              const r = more(joins);
              if (r) joined.push({ r, t0: performance.now() });
              return r;
            };
            // One reaction on the group's promise, not an async frame awaiting it (one per group).
            return target.executeGroup!(first, joining, status).then(
              (responses) => {
                report(responses);
                return responses;
              },
              (err: unknown) => {
                report(null);
                throw err;
              },
            );
          },
        }
      : {}),
  };
}

/** An execute function (a QEMU endpoint's) with every command reported to `obs`. */
export function observeExecute<A extends unknown[]>(
  execute: (command: Uint8Array, ...rest: A) => Promise<Uint8Array>,
  obs: GuestObserver,
): (command: Uint8Array, ...rest: A) => Promise<Uint8Array> {
  return async (command, ...rest) => {
    const t0 = performance.now();
    let response: Uint8Array | null = null;
    try {
      response = await execute(command, ...rest);
      return response;
    } finally {
      obs.done(command, response, t0);
    }
  };
}

/** `guest attach --pcap`: the capture file and its bound in MiB the toolstack wrote in the device's backend node. */
export function captureKeys(xs: XsClient, backend: string): [Promise<string | undefined>, Promise<string | undefined>] {
  return [xs.tryRead(`${backend}/capture`), xs.tryRead(`${backend}/capture-max-mb`)];
}

/** What a xenbus device reports: its state, suspends and resumes, cut-offs, and its capture. */
export class DeviceObservation {
  readonly #key: object;
  readonly #domid: number;
  readonly #devid: number;
  readonly #log: (line: string) => void;
  readonly #captures: XsCaptureRouter | undefined;
  #observer: GuestObserver | null = null;
  #capture: GuestCapture | null = null;
  /** When the guest asked to suspend (performance.now), until its suspend is acknowledged. */
  #suspendT0 = -1;

  constructor(key: object, domid: number, devid: number, log: (line: string) => void, captures?: XsCaptureRouter) {
    this.#key = key;
    this.#domid = domid;
    this.#devid = devid;
    this.#log = log;
    this.#captures = captures;
  }

  /**
   * Open the capture the toolstack asked for (once per device, kept across reconnects); resolves once
   * the guest's own xenstore traffic reaches it, so the device's start is captured from its first step.
   */
  async open(capture: string | undefined, captureMaxMb: string | undefined): Promise<void> {
    if (!capture || this.#capture) return;
    const mb = Number(captureMaxMb ?? 100);
    try {
      this.#capture = new GuestCapture(capture, (Number.isFinite(mb) && mb > 0 ? mb : 100) * 1024 * 1024, this.#domid, this.#devid, this.#log);
    } catch (err) {
      this.#log(`dom${this.#domid}: capture ${capture}: ${(err as Error).message}; not capturing`);
      return;
    }
    this.#log(`dom${this.#domid}: capturing to ${capture}`);
    await this.#captures?.add(this.#domid, this.#capture);
  }

  /**
   * A frontend connects: this guest's observer, with the capture open() made at device start (the
   * toolstack writes the capture keys with the device, so a connect has nothing new to read).
   */
  attach(vm: string, transport: 'v2' | 'ring'): GuestObserver {
    if (this.#observer?.labels.vm !== vm || this.#observer.labels.transport !== transport) {
      this.#observer = new GuestObserver({ domid: String(this.#domid), vm, transport }, this.#capture);
    }
    return this.#observer;
  }

  /** What the metrics show of the device: its backend xenbus state. */
  show(state: string): void {
    const l = this.#observer?.labels;
    metricsSink()?.showGuest(this.#key, { domid: String(this.#domid), vm: l?.vm ?? '', transport: l?.transport ?? 'none', state });
  }

  /** The frontend's ring or page is mapped and the device Connected (`t0`: when the attach began). */
  connected(resume: boolean, t0: number): void {
    this.#capture?.newStream();
    this.show('Connected');
    if (!resume || !this.#observer) return;
    const transport = this.#observer.labels.transport;
    const m = metricsSink()?.backendMetrics();
    m?.resumes.inc({ transport });
    m?.resumeDuration.observe({ transport }, since(t0));
  }

  /** The guest is closing (its Closing, or the ring's suspend notice): a suspend's clock starts at the first. */
  closing(): void {
    if (this.#suspendT0 < 0) this.#suspendT0 = performance.now();
    this.show('Closing');
  }

  /** The suspend is acknowledged (the vTPM state saved). */
  suspended(): void {
    const transport = this.#observer?.labels.transport ?? 'v2';
    const m = metricsSink()?.backendMetrics();
    m?.suspends.inc({ transport });
    if (this.#suspendT0 >= 0) m?.suspendDuration.observe({ transport }, since(this.#suspendT0));
  }

  /** The frontend's connection is closed (suspended or not); unless the device goes offline it waits for the next. */
  closed(offline: boolean): void {
    this.#suspendT0 = -1;
    if (!offline) this.show('InitWait');
  }

  cutOff(kind: string, reason: string): void {
    if (this.#observer) this.#observer.cutOff(kind);
    else {
      metricsSink()?.backendMetrics().cutOff.inc({ reason: kind });
      metricsSink()?.guestError(String(this.#domid), '', `cut_off_${kind}`);
    }
    this.#capture?.note(`cut off: ${reason}`);
    this.#suspendT0 = -1;
    this.show('Closing');
  }

  /** The device is gone: no more series, the capture closed. */
  end(): void {
    metricsSink()?.forgetGuest(this.#key);
    if (!this.#capture) return;
    this.#captures?.remove(this.#domid);
    void this.#capture.close();
    this.#capture = null;
  }
}
