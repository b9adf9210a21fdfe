// The VM → vTPM table (Xen 3.x kept it in /var/vtpm/VTPM): which instance serves which VM, its TPM
// version, when it was created and last seen, and whether it is open. Instance 0 is reserved for the
// control domain, as in Xen. The table is persisted inside the store's authenticated metadata.
import { isUuid, type EkCode, type TpmVersion } from './wire.js';

/** 'migrated': MIGRATE_OUT handed this vTPM to another manager (Xen's VTPM_TYPE_MIGRATED); only DELETE is left. */
export type VmStatus = 'open' | 'closed' | 'migrated';

/** Xen's OPEN mig_type byte: VTPM_TYPE_NON_MIGRATABLE 0, MIGRATABLE 1 (MIGRATED 0xFF is our status 'migrated'). */
export const MigType = { NON_MIGRATABLE: 0, MIGRATABLE: 1, MIGRATED: 0xff } as const;

export interface VmRecord {
  vmUuid: string;
  instance: number;
  version: TpmVersion;
  /** ISO 8601 */
  created: string;
  lastSeen: string;
  status: VmStatus;
  /** Xen's OPEN fields, kept for `vtpm manager` users who inspect the table. */
  vmType: number;
  startup: number;
  /** OPEN's mig_type; absent in tables written before migration existed (then: migratable). */
  migType?: number;
  /**
   * How many times this vTPM has moved between managers: 0 when created here, the blob's counter when
   * it came in by MIGRATE_IN. A MIGRATE_OUT blob carries this + 1.
   */
  migCounter?: number;
  /** The EK certificates its TPM was manufactured with here ('none': left to its first power-on); absent: not made by this manager. */
  ek?: EkCode;
  /** Set by MIGRATE_OUT: where it went (destination key fingerprint, hex) and under which counter. */
  migratedTo?: { name: string; keyFingerprint: string; counter: number; at: string };
}

export class VmTableError extends Error {
  constructor(
    readonly code: 'UNKNOWN_INSTANCE' | 'UNKNOWN_VM' | 'INSTANCE_TAKEN' | 'VM_PRESENT' | 'VERSION_MISMATCH' | 'INSTANCE_MISMATCH' | 'MIGRATED' | 'FULL' | 'FORMAT',
    message: string,
  ) {
    super(message);
    this.name = 'VmTableError';
  }
}

export const MAX_INSTANCE = 0xfffffffe;

/** The uuid a Xen 3.x hotplug OPEN (no uuid on the wire) gets: derived from the instance number. */
export function legacyUuid(instance: number): string {
  return `00000000-0000-4000-8000-${instance.toString(16).padStart(12, '0')}`;
}

export interface OpenRequest {
  vmUuid: string;
  version: TpmVersion;
  /** 0: any (new VM) or whatever the table says (known VM). */
  instance: number;
  vmType: number;
  startup: number;
  /** Xen's mig_type byte (default MIGRATABLE, what Xen's hotplug scripts send). */
  migType?: number;
}

export class VmTable {
  #byUuid = new Map<string, VmRecord>();
  #byInstance = new Map<number, VmRecord>();

  constructor(records: VmRecord[] = []) {
    for (const r of records) this.#add(r);
  }

  static fromJSON(x: unknown): VmTable {
    if (x === null || x === undefined) return new VmTable();
    if (!Array.isArray(x)) throw new VmTableError('FORMAT', 'VM table is not a list');
    for (const r of x as VmRecord[]) {
      if (!r || !isUuid(r.vmUuid) || !Number.isInteger(r.instance) || r.instance < 1 || (r.version !== '1.2' && r.version !== '2.0'))
        throw new VmTableError('FORMAT', `bad VM table record ${JSON.stringify(r)}`);
    }
    return new VmTable(x as VmRecord[]);
  }

  /** Replaces every record (a cluster store's table, read again because other hosts change it). */
  replace(records: VmRecord[]): void {
    this.#byUuid.clear();
    this.#byInstance.clear();
    for (const r of records) this.#add(r);
  }

  toJSON(): VmRecord[] {
    return [...this.#byInstance.values()].sort((a, b) => a.instance - b.instance);
  }

  get size(): number {
    return this.#byInstance.size;
  }

  byInstance(instance: number): VmRecord | undefined {
    return this.#byInstance.get(instance);
  }

  byUuid(vmUuid: string): VmRecord | undefined {
    return this.#byUuid.get(vmUuid);
  }

  #add(r: VmRecord): void {
    this.#byUuid.set(r.vmUuid, r);
    this.#byInstance.set(r.instance, r);
  }

  #allocate(): number {
    let i = 1;
    for (const n of [...this.#byInstance.keys()].sort((a, b) => a - b)) {
      if (n > i) break;
      if (n === i) i++;
    }
    if (i > MAX_INSTANCE) throw new VmTableError('FULL', 'no free instance number');
    return i;
  }

  /** No entry: create one (created = true). Entry: resume it, checking the request agrees with it. */
  open(req: OpenRequest, now = new Date()): { record: VmRecord; created: boolean } {
    const t = now.toISOString();
    const known = this.#byUuid.get(req.vmUuid);
    if (known) {
      if (known.status === 'migrated')
        throw new VmTableError(
          'MIGRATED',
          `vm ${req.vmUuid} (instance ${known.instance}) was migrated out to ${known.migratedTo?.name ?? '?'} (counter ${known.migratedTo?.counter ?? '?'}); DELETE it before using this uuid here again`,
        );
      if (req.instance !== 0 && req.instance !== known.instance)
        throw new VmTableError('INSTANCE_MISMATCH', `vm ${req.vmUuid} is instance ${known.instance}, not ${req.instance}`);
      if (known.version !== req.version)
        throw new VmTableError('VERSION_MISMATCH', `vm ${req.vmUuid} has a TPM ${known.version}, not ${req.version}`);
      known.status = 'open';
      known.lastSeen = t;
      known.startup = req.startup;
      return { record: known, created: false };
    }
    let instance = req.instance;
    if (instance === 0) instance = this.#allocate();
    else if (this.#byInstance.has(instance))
      throw new VmTableError('INSTANCE_TAKEN', `instance ${instance} already serves vm ${this.#byInstance.get(instance)!.vmUuid}`);
    if (instance > MAX_INSTANCE) throw new VmTableError('FULL', `instance ${instance} is out of range`);
    const record: VmRecord = {
      vmUuid: req.vmUuid,
      instance,
      version: req.version,
      created: t,
      lastSeen: t,
      status: 'open',
      vmType: req.vmType,
      startup: req.startup,
      migType: req.migType ?? MigType.MIGRATABLE,
      migCounter: 0,
    };
    this.#add(record);
    return { record, created: true };
  }

  /** A free instance number: `want` if free (0: the lowest free one). */
  freeInstance(want: number): number {
    if (want === 0) return this.#allocate();
    if (want > MAX_INSTANCE) throw new VmTableError('FULL', `instance ${want} is out of range`);
    const r = this.#byInstance.get(want);
    if (r) throw new VmTableError('INSTANCE_TAKEN', `instance ${want} already serves vm ${r.vmUuid}`);
    return want;
  }

  /** Adds a record made elsewhere (MIGRATE_IN); the uuid and instance must both be free. */
  insert(record: VmRecord): void {
    const byUuid = this.#byUuid.get(record.vmUuid);
    if (byUuid) throw new VmTableError('VM_PRESENT', `vm ${record.vmUuid} is already here as instance ${byUuid.instance} (${byUuid.status})`);
    this.freeInstance(record.instance);
    this.#add(record);
  }

  close(instance: number, now = new Date()): VmRecord {
    const r = this.#need(instance);
    // A migrated vTPM stays migrated: a backend's CLOSE after the move must not make it resumable.
    if (r.status !== 'migrated') r.status = 'closed';
    r.lastSeen = now.toISOString();
    return r;
  }

  touch(instance: number, now = new Date()): void {
    const r = this.#byInstance.get(instance);
    if (r) r.lastSeen = now.toISOString();
  }

  delete(instance: number): VmRecord {
    const r = this.#need(instance);
    this.#byInstance.delete(instance);
    this.#byUuid.delete(r.vmUuid);
    return r;
  }

  #need(instance: number): VmRecord {
    const r = this.#byInstance.get(instance);
    if (!r) throw new VmTableError('UNKNOWN_INSTANCE', `no vTPM instance ${instance}`);
    return r;
  }
}
