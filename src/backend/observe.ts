// What the backend reports about each guest's commands: the metrics (src/util/metrics.ts) and, when
// the toolstack asked for one, the capture (capture.ts). A guest's vTPM target is wrapped once, where
// its channel or QEMU endpoint is opened, so every transport is measured at the same point: from a
// command reaching the vTPM to its answer being ready (durable, on the ring).
import type { Counter } from 'prom-client';
import { backendMetrics, guestError, since, type CommandOutcome, type Transport } from '../util/metrics.js';
import { commandName, responseRc } from '../tpm/command-names.js';
import type { OnceRequest, VtpmTarget } from './target.js';
import type { GuestCapture } from './capture.js';

export interface GuestLabels {
  /** '' for a QEMU endpoint (no domain); its vm tells it apart. */
  domid: string;
  vm: string;
  transport: Transport;
}

type CommandChild = ReturnType<Counter<'domid' | 'vm' | 'transport' | 'command' | 'rc'>['labels']>;

export class GuestObserver {
  readonly labels: GuestLabels;
  capture: GuestCapture | null;
  /** Counter children by command name and outcome, so a command costs no label lookup. */
  readonly #children = new Map<string, CommandChild>();
  readonly #duration;

  constructor(labels: GuestLabels, capture: GuestCapture | null = null) {
    this.labels = labels;
    this.capture = capture;
    this.#duration = backendMetrics().duration.labels(labels.transport, labels.domid, labels.vm);
  }

  /** One command answered (`response` null: no TPM answer, the backend made up a failure). */
  done(command: Uint8Array, response: Uint8Array | null, t0: number): void {
    const rc = response === null ? -1 : responseRc(response);
    const outcome: CommandOutcome = response === null ? 'failure' : rc === 0 ? 'success' : 'tpm_error';
    const name = commandName(command);
    const key = `${name}/${outcome}`;
    let c = this.#children.get(key);
    if (!c) this.#children.set(key, (c = backendMetrics().commands.labels(this.labels.domid, this.labels.vm, this.labels.transport, name, outcome)));
    c.inc();
    this.#duration.observe(since(t0));
    if (outcome !== 'success') guestError(this.labels.domid, this.labels.vm, outcome);
    this.capture?.command(command, response, t0);
  }

  /** The guest was cut off (`reason` from a fixed set). */
  cutOff(reason: string): void {
    backendMetrics().cutOff.inc({ reason });
    guestError(this.labels.domid, this.labels.vm, `cut_off_${reason}`);
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
          executeGroup: async (first, more, status) => {
            // Each request is timed from when it joined the group to the group's durable answer.
            const joined: Array<{ r: OnceRequest; t0: number }> = [{ r: first, t0: performance.now() }];
            let responses: Uint8Array[] | null = null;
            try {
              responses = await target.executeGroup!(
                first,
                (joins) => {
                  const r = more(joins);
                  if (r) joined.push({ r, t0: performance.now() });
                  return r;
                },
                status,
              );
              return responses;
            } finally {
              joined.forEach((j, i) => obs.done(j.r.command, responses?.[i] ?? null, j.t0));
            }
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
