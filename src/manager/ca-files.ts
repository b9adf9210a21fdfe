// The names of the EK CA's files, apart from ca.ts so that commands which only read them (`vtpm ca
// show`) do not load the X.509 library.
export const CA_DIR = 'ca';
/** The chain (issuing certificate first), public: the manager writes it into its run directory at start. */
export const CA_CHAIN_FILE = 'ek-ca-chain.pem';
export const OPERATOR_CERT = 'cert.pem';
export const OPERATOR_KEY = 'key.pem';

/** What a platform certificate says about the platform (`host up --platform-*`). */
export interface PlatformIdentity {
  manufacturer: string;
  model: string;
  version: string;
}
export const DEFAULT_PLATFORM: PlatformIdentity = { manufacturer: 'vtpm-split', model: 'vtpm-split', version: '1' };
