// What every guest-side transport offers the layers above (TpmFront, the TCTI bridge): send one TPM
// command and get its response. Implementations: the tpmif v2 page (src/frontend/v2-front.ts) and
// the multi-request ring (ring-front.ts).

export interface TransmitOptions {
  locality?: number;
  /** Ring protocol: the request id to use (a resubmission after resume); default the next fresh id. */
  id?: bigint;
}

export interface TpmTransport {
  readonly protocol: 'v2' | 'ring';
  /** What the frontend publishes in xenstore: ring-ref(s) and event-channel. */
  readonly refs: readonly number[];
  readonly port: number;
  transmit(command: Uint8Array, opts?: TransmitOptions): Promise<Uint8Array>;
  /** Cancel what is outstanding; each cancelled transmit still resolves (TPM_RC_CANCELED) or rejects. */
  cancel(): void;
  /** Release the page(s) and the event channel. */
  close(): Promise<void>;
  /** The shared page this transport publishes as ring-ref (for protocol studies and fault injection). */
  readonly sharedPage: Uint8Array;
}

export class FrontendError extends Error {
  constructor(
    readonly code: 'ECANCELED' | 'EINVAL' | 'E2BIG' | 'ENODEV' | 'EPROTO' | 'ETIME',
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'FrontendError';
  }
}
