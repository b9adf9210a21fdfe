// The emulated hypervisor's public surface.
export { Domain, DomainError, DOMID_SELF, createDomainConnection, domainExists } from './domain.js';
export { HypercallClient, HypercallError, HC } from './hypercall.js';
export {
  GrantTable,
  GrantMapper,
  GrantMapping,
  GrantError,
  GNTST,
  GTF_permit_access,
  GTF_readonly,
  GTF_reading,
  GTF_writing,
} from './grant-table.js';
export { EventChannels, EventChannelError, ECS_closed, ECS_unbound, ECS_interdomain } from './event-channel.js';
export { SharedRing, FrontRing, BackRing, RingError, ringSize, RING_HEADER_SIZE } from './ring.js';
export { PAGE_SIZE, xenDir } from './layout.js';
export { PollWindow, spinUntil, defaultPollUs, cpuContended, StandAside, type SpinPeer } from './poll.js';
export { EchoFrontend, ECHO_OP, ECHO_SLOT, type RingOffer, type EchoFrontendOptions } from './echo-front.js';
export { EchoBackend, type EchoBackendOptions } from './echo-back.js';
