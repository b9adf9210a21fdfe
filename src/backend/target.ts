// What a backend channel drives: the guest's vTPM, wherever it runs (an in-process libtpms instance in
// single-VM mode, a vTPM-domain process in multi-VM mode). Commands arrive one at a time per target.
export interface VtpmTarget {
  /** Run one command at `locality`; resolves with the response once every NV write it made is durable. */
  execute(command: Uint8Array, opts: { locality: number }): Promise<Uint8Array>;
  /** Ask the running command, if any, to stop early (TPMLIB_CancelCommand); it still resolves. */
  cancel(): void;
}
