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
   * Run request `id` once: resolves only after the response, its status and the vTPM's volatile state
   * are durable together, so a later resubmission of `id` gets this answer instead of a second run.
   */
  executeOnce?(id: bigint, command: Uint8Array, opts: { locality: number }, status: (response: Uint8Array) => number): Promise<Uint8Array>;
  /** Save the vTPM's volatile state at the manager (suspend). */
  checkpoint?(): Promise<void>;
}
