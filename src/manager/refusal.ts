// A handler's answer to a manager request, and the refusal that carries a status back to its sender.
import type { StatusCode } from './wire.js';

/** A refusal: the status sent back and the log line naming the offender. */
export class Refusal extends Error {
  constructor(
    readonly status: StatusCode,
    message: string,
  ) {
    super(message);
  }
}

export interface Reply {
  status: StatusCode;
  params?: Uint8Array;
}
