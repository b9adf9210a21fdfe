// The one interface the backend dispatches a frontend's device through, whichever transport the
// frontend chose in xenstore (docs/protocols/tpmif.md): the v2 page or the multi-request ring.
import type { Domain } from '../xen/index.js';
import type { VtpmTarget } from '../tpm/vtpm.js';
import { V2Channel } from './v2-channel.js';
import { RingChannel } from './ring-channel.js';
import type { RingTap } from './capture.js';

export interface ChannelOptions {
  frontDomid: number;
  /** ring-ref: the grant of the shared page. */
  refs: number[];
  /** event-channel: the frontend's unbound port. */
  port: number;
  target: VtpmTarget;
  /** The frontend broke the protocol: the caller must cut it off (its device to Closing). `kind` names the violation (a metric label). */
  onFatal: (reason: string, kind: string) => void;
  /** Ring and page events, for a capture (docs/observability.md). */
  tap?: RingTap;
  log?: (line: string) => void;
  /** Poll window after each answer in µs (default VTPM_POLL_US or 50; 0 = never poll). */
  pollUs?: number;
  /** When the channel's poll stands down (default: CPU pressure, src/xen/poll.ts). */
  pollContended?: () => boolean;
  /**
   * The frontend announced its suspend on the ring (ring protocol, op 2), after the requests before
   * the notice were answered: quiesce and go Closing; the notice is answered when this resolves.
   */
  onSuspend?: () => Promise<void>;
}

export interface Channel {
  readonly protocol: 'v2' | 'ring';
  readonly frontDomid: number;
  /** Commands answered so far. */
  readonly commands: number;
  /** Resolves once every request accepted so far is answered. */
  drain(): Promise<void>;
  /** Unbind the port and unmap the frontend's pages; nothing more is answered. */
  close(): void;
  /** An event on the frontend's port with nothing on the ring: we are Connected (ring protocol). */
  notifyConnected?(): void;
}

/** Map the frontend's page(s) and bind its port; throws if either is refused. */
export function openChannel(dom: Domain, protocol: 'v2' | 'ring', opts: ChannelOptions): Channel {
  return protocol === 'ring' ? new RingChannel(dom, opts) : new V2Channel(dom, opts);
}
