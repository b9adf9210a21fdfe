// The package's public entry point (`import … from 'vtpm-split'`): the TPM engine, the vTPM manager
// and its client, XenStore (daemon, client, xenbus helpers), the split-driver front and back ends on
// emulated Xen domains, and the CLI's host and guest operations as functions. docs/cli.md shows use.

// The engine first: its native module sets koffi up before any other native code loads.
export { TpmHost, TpmHostError, type CreateOptions, type HostOptions } from './tpm/host.js';
export { TpmInstance, type TpmVersion } from './tpm/instance.js';
export { TpmInstanceError, type ExecuteOptions, type InstanceOptions, type InstanceStatus } from './tpm/instance-types.js';
export { DirStateStore, type DirStoreOptions } from './tpm/dir-store.js';
export { STATE_KINDS, type StateKind, type StateStore } from './tpm/state-store.js';

export { ManagerClient, ManagerError, type ConnectOptions, type OpenOptions } from './manager/client.js';
export { ManagerDaemon } from './manager/daemon.js';

export { XsClient, connect as connectXenstore } from './xenstore/client.js';
export { XenstoreDaemon } from './xenstore/daemon.js';
export { XenbusState, vtpmDevice, waitForState, type VtpmDevice } from './xenstore/xenbus.js';
export { removeDeviceDirectories, writeDeviceDirectories } from './xenstore/xenbus-toolstack.js';

export { Domain } from './xen/index.js';
export { TpmFront, type Protocol } from './frontend/tpmfront.js';
export { TctiBridge } from './frontend/tcti-bridge.js';
export { Backend } from './backend/tpmback.js';
export { InProcessVtpms } from './backend/single-vm.js';

export { hostUp, hostDown, hostStatus, type HostStatus } from './cli/host.js';
export { guestAttach, guestDetach, type AttachOptions } from './cli/guest.js';
export { RunDir, type HostInfo, type GuestInfo } from './cli/rundir.js';
export { CliError } from './cli/errors.js';
