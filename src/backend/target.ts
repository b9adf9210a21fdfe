// What a backend channel drives: the guest's vTPM, wherever it runs (an in-process libtpms instance in
// single-VM mode, a vTPM-domain process in multi-VM mode). Commands arrive one at a time per target.
export interface VtpmTarget {
  /** Run one command at `locality`; resolves with the response once every NV write it made is durable. */
  execute(command: Uint8Array, opts: { locality: number }): Promise<Uint8Array>;
  /** Ask the running command, if any, to stop early (TPMLIB_CancelCommand); it still resolves. */
  cancel(): void;
  /**
   * Exactly-once (ring requests carry u64 ids): the stored answer of a request id that already
   * completed, across suspend/resume and backend restarts. Targets without it run every request.
   */
  completed?(id: bigint): { status: number; response: Uint8Array } | undefined;
  /**
   * Run ring requests once each, several under one checkpoint (group commit): `first`, then whatever
   * `more` still hands over (it is asked with a predicate saying which commands may join: ones that
   * cannot hold the earlier answers back). Each is recorded in the exactly-once table; resolves with
   * their responses, in order, only once their answers, ids and the vTPM's volatile state are durable
   * together, so a later resubmission of any of these ids gets its answer instead of a second run.
   */
  executeGroup?(
    first: OnceRequest,
    more: (joins: (command: Uint8Array) => boolean) => OnceRequest | undefined,
    status: (request: OnceRequest, response: Uint8Array) => number,
  ): Promise<Uint8Array[]>;
  /** Make the vTPM's volatile state durable at the manager (suspend); nothing to do if it already is. */
  checkpoint?(): Promise<void>;
}

/** A ring request as executeGroup takes it. */
export interface OnceRequest {
  id: bigint;
  command: Uint8Array;
  locality: number;
}
