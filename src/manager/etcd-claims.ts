// One host's hold on its VMs in an etcd cluster: the connection (endpoints, TLS passed through), one
// lease kept alive every TTL/3, and a claim key per VM bound to that lease. A claim is what makes this
// host the only writer of a VM: every save is a transaction conditioned on the claim still carrying this
// host's lease (etcd-store.ts), so once the lease is gone (the host paused or partitioned past the TTL,
// or killed) nothing it sends is applied, and another host may claim the VM. Only etcd decides; this
// host's own view of its lease is a hint for log lines and error messages (docs/cluster.md).
import fs from 'node:fs';
import { ConsecutiveBreaker, circuitBreaker, handleWhen } from 'cockatiel';
import { Etcd3, CompareResult, CompareTarget, EtcdLeaseInvalidError, isRecoverableError, type IKeyValue } from 'etcd3';

export type EtcdStoreErrorCode = 'URL' | 'HELD' | 'FENCED' | 'UNAVAILABLE' | 'KEY_MISMATCH' | 'FORMAT';

export class EtcdStoreError extends Error {
  constructor(
    readonly code: EtcdStoreErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'EtcdStoreError';
  }
}

export interface EtcdTls {
  /** PEM files: the CA that signed the members' certificates, and a client certificate and key if they ask for one. */
  ca: string;
  cert?: string;
  key?: string;
}

export interface EtcdTarget {
  endpoints: string[];
  /** Key prefix of this cluster's vTPM state (default "vtpm/"). */
  prefix: string;
}

/** `etcd://H:P[,H:P…][/prefix]`. */
export function parseEtcdUrl(url: string): EtcdTarget {
  const m = /^etcd:\/\/([^/]+)(\/.*)?$/.exec(url);
  if (!m) throw new EtcdStoreError('URL', `store "${url}" is not etcd://HOST:PORT[,HOST:PORT…][/prefix]`);
  const endpoints = m[1]!.split(',');
  for (const e of endpoints) {
    const hp = /^([A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$/.exec(e);
    if (!hp || Number(hp[2]) < 1 || Number(hp[2]) > 65535) throw new EtcdStoreError('URL', `store "${url}": "${e}" is not HOST:PORT`);
  }
  const p = (m[2] ?? '/vtpm').replace(/^\/+|\/+$/g, '');
  if (p === '' || !/^[A-Za-z0-9._/-]+$/.test(p)) throw new EtcdStoreError('URL', `store "${url}": prefix "${p}" must be letters, digits, . _ - /`);
  return { endpoints, prefix: `${p}/` };
}

/** Unary calls give up after this long, so a save answers FAIL while etcd is down instead of hanging. */
const CALL_DEADLINE_MS = 3000;

export function connect(target: EtcdTarget, tls?: EtcdTls): Etcd3 {
  const scheme = tls ? 'https' : 'http';
  return new Etcd3({
    hosts: target.endpoints.map((e) => `${scheme}://${e}`),
    credentials: tls
      ? { rootCertificate: fs.readFileSync(tls.ca), privateKey: tls.key ? fs.readFileSync(tls.key) : undefined, certChain: tls.cert ? fs.readFileSync(tls.cert) : undefined }
      : undefined,
    dialTimeout: CALL_DEADLINE_MS,
    // A member that fails three calls in a row is skipped for a second (the client's default is 5 s),
    // and reconnects are tried at least every second: service comes back within about a second of etcd.
    faultHandling: { host: () => circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: 1000, breaker: new ConsecutiveBreaker(3) }) },
    // Answers past gRPC's default 4 MiB: a VM table of thousands of records, a blob near the manager's 16 MiB.
    grpcOptions: { 'grpc.initial_reconnect_backoff_ms': 200, 'grpc.max_reconnect_backoff_ms': 1000, 'grpc.max_receive_message_length': 64 * 1024 * 1024 },
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + CALL_DEADLINE_MS }),
  });
}

/** Any failure to get an answer from etcd (refused, timed out, no quorum) as one error class. */
export function unavailable(err: unknown, what: string): EtcdStoreError {
  if (err instanceof EtcdStoreError) return err;
  return new EtcdStoreError('UNAVAILABLE', `${what}: etcd did not answer (${(err as Error).message.split('\n')[0]})`);
}

/**
 * Creates `key` only if it does not exist (etcd's create_revision 0 compare). Returns null when it was
 * created, else the key as it is: the caller decides whether what is there is its own.
 */
export async function putIfAbsent(client: Etcd3, key: Buffer, value: Buffer, lease?: string): Promise<IKeyValue | null> {
  const r = await client.kv.txn({
    compare: [{ key, target: CompareTarget.Create, result: CompareResult.Equal, create_revision: 0 }],
    success: [{ request_put: lease === undefined ? { key, value } : { key, value, lease } }],
    failure: [{ request_range: { key } }],
  });
  if (r.succeeded) return null;
  // The compare and the read are one transaction: a failed compare always reads the key.
  return r.responses[0]!.response_range.kvs[0]!;
}

const hex = (id: string): string => BigInt(id).toString(16);

export class Claims {
  #lease: string | null = null;
  #granting: Promise<string> | null = null;
  /** VM uuid → the lease its claim was taken under. */
  readonly #held = new Map<string, string>();
  #timer: NodeJS.Timeout | null = null;
  #ticking = false;
  #failing = false;

  constructor(
    private readonly client: Etcd3,
    private readonly prefix: string,
    readonly host: string,
    readonly ttlSeconds: number,
    private readonly log: (line: string) => void,
    /** The VM's name in etcd keys (etcd-store.ts: a MAC of the uuid, so etcd never sees uuids). */
    private readonly vmId: (vmUuid: string) => string,
  ) {}

  claimKey(vmUuid: string): Buffer {
    return Buffer.from(`${this.prefix}claim/${this.vmId(vmUuid)}`);
  }

  /** The lease this host's claim on `vmUuid` was taken under, if it holds one. */
  leaseOf(vmUuid: string): string | undefined {
    return this.#held.get(vmUuid);
  }

  /** This host's lease, granted on first use and again after etcd reported it gone. */
  async lease(): Promise<string> {
    if (this.#lease) return this.#lease;
    this.#granting ??= (async () => {
      try {
        const r = await this.client.leaseClient.leaseGrant({ TTL: this.ttlSeconds });
        this.#lease = r.ID;
        this.log(`etcd lease ${hex(r.ID)} granted (TTL ${r.TTL} s) for host "${this.host}"`);
        this.#timer ??= setInterval(() => void this.#keepAlive(), (this.ttlSeconds * 1000) / 3);
        return r.ID;
      } catch (err) {
        throw unavailable(err, 'granting a lease');
      } finally {
        this.#granting = null;
      }
    })();
    return this.#granting;
  }

  async #keepAlive(): Promise<void> {
    const id = this.#lease;
    if (!id || this.#ticking) return;
    this.#ticking = true;
    try {
      const stream = await this.client.leaseClient.leaseKeepAlive();
      const ttl = await new Promise<string>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no keepalive answer')), CALL_DEADLINE_MS);
        stream.on('data', (r: { TTL: string }) => (clearTimeout(t), resolve(r.TTL)));
        stream.on('error', (e: Error) => (clearTimeout(t), reject(e)));
        stream.write({ ID: id });
      }).finally(() => stream.end());
      if (this.#failing) this.log(`etcd lease ${hex(id)} renewed again`);
      this.#failing = false;
      if (ttl === '0') this.#lost(id, 'etcd says it expired');
    } catch (err) {
      if (!this.#failing) this.log(`etcd lease ${hex(id)}: keepalive failed (${(err as Error).message.split('\n')[0]}); retrying`);
      this.#failing = true;
    } finally {
      this.#ticking = false;
    }
  }

  /** The lease is gone: every claim under it is gone too; the next OPEN claims under a new lease. */
  #lost(id: string, why: string): void {
    if (this.#lease === id) this.#lease = null;
    const vms = [...this.#held].filter(([, l]) => l === id).map(([vm]) => vm);
    for (const vm of vms) this.#held.delete(vm);
    this.log(`etcd lease ${hex(id)} lost (${why}); claims on ${vms.length ? vms.join(', ') : 'no VM'} are gone, their saves are refused`);
  }

  /** A save found the claim not ours: forget it, and say who holds it now. */
  forget(vmUuid: string, holder: IKeyValue | undefined): EtcdStoreError {
    const lease = this.#held.get(vmUuid);
    this.#held.delete(vmUuid);
    const now = holder ? `host "${holder.value.toString()}" holds it now (lease ${hex(holder.lease)})` : 'nobody holds it now';
    return new EtcdStoreError('FENCED', `host "${this.host}" no longer holds vm ${vmUuid} (its lease ${lease ? hex(lease) : '?'} expired or was revoked; ${now}); write refused`);
  }

  /**
   * Takes the VM for this host: a claim key bound to this host's lease, created only if absent. Held
   * by this host's current lease already (a retried request, a re-OPEN): fine. Held by anyone else:
   * refused with the holder's name.
   */
  async claim(vmUuid: string, retried = false): Promise<void> {
    const lease = await this.lease();
    const key = this.claimKey(vmUuid);
    let kv: IKeyValue | null | undefined;
    try {
      kv = await putIfAbsent(this.client, key, Buffer.from(this.host), lease);
    } catch (err) {
      // Our lease expired or was revoked before the keepalive noticed: a new one, once.
      if (err instanceof EtcdLeaseInvalidError && !retried) {
        this.#lost(lease, 'etcd no longer knows it');
        return this.claim(vmUuid, true);
      }
      throw unavailable(err, `claiming vm ${vmUuid}`);
    }
    if (kv) kv = await this.#takeOverOwn(vmUuid, kv, lease);
    if (kv && kv.lease !== lease) {
      throw new EtcdStoreError(
        'HELD',
        `vm ${vmUuid} is held by host "${kv.value.toString()}" (lease ${hex(kv.lease)}); it can be taken here once that host closes it or stops renewing its lease for ${this.ttlSeconds} s`,
      );
    }
    // Our old claim expired between the two transactions: nobody holds it, so create it again.
    if (kv === undefined) return this.claim(vmUuid, retried);
    if (!this.#held.has(vmUuid)) this.log(`claimed vm ${vmUuid} (lease ${hex(lease)})`);
    this.#held.set(vmUuid, lease);
  }

  /**
   * This host's own claim from before its manager restarted (one manager per host name: the pid files)
   * moves to the new lease, unless it changed meanwhile. Returns the claim as it is afterwards.
   */
  async #takeOverOwn(vmUuid: string, kv: IKeyValue, lease: string): Promise<IKeyValue | undefined> {
    if (kv.lease === lease || kv.value.toString() !== this.host) return kv;
    const key = this.claimKey(vmUuid);
    try {
      const t = await this.client.kv.txn({
        compare: [{ key, target: CompareTarget.Mod, result: CompareResult.Equal, mod_revision: kv.mod_revision }],
        success: [{ request_put: { key, value: Buffer.from(this.host), lease } }],
        failure: [{ request_range: { key } }],
      });
      return t.succeeded ? { ...kv, lease } : t.responses[0]?.response_range.kvs[0];
    } catch (err) {
      throw unavailable(err, `claiming vm ${vmUuid}`);
    }
  }

  /**
   * At start: claims this host's previous manager left (killed, crashed; its lease may still live) are
   * taken over under the new lease, so its backend's VMs go on without another OPEN. Returns the VMs.
   */
  async adoptOwn(uuidOf: (id: string) => string | undefined): Promise<string[]> {
    const from = Buffer.from(`${this.prefix}claim/`);
    let kvs: IKeyValue[];
    try {
      kvs = (await this.client.kv.range({ key: from, range_end: Buffer.from(`${this.prefix}claim0`) })).kvs;
    } catch (err) {
      throw unavailable(err, 'reading claims');
    }
    // The claims were just read: each moves to the new lease in one compare-and-put, all at once.
    const lease = await this.lease();
    const adopted: string[] = [];
    await Promise.all(
      kvs.map(async (kv) => {
        const vm = uuidOf(kv.key.toString().slice(from.length));
        if (vm === undefined || kv.value.toString() !== this.host) return;
        try {
          const now = await this.#takeOverOwn(vm, kv, lease);
          if (now === undefined) await this.claim(vm);
          else if (now.lease !== lease) throw new EtcdStoreError('HELD', `host "${now.value.toString()}" took it meanwhile`);
          else {
            this.#held.set(vm, lease);
            this.log(`claimed vm ${vm} (lease ${hex(lease)})`);
          }
          adopted.push(vm);
        } catch (err) {
          this.log(`vm ${vm}: not taken over: ${(err as Error).message}`);
        }
      }),
    );
    return adopted;
  }

  /** Gives the VM up (CLOSE, DELETE): deletes the claim if it still carries our lease. */
  async release(vmUuid: string): Promise<void> {
    const lease = this.#held.get(vmUuid);
    if (!lease) return;
    const key = this.claimKey(vmUuid);
    try {
      await this.client.kv.txn({
        compare: [{ key, target: CompareTarget.Lease, result: CompareResult.Equal, lease }],
        success: [{ request_delete_range: { key } }],
      });
    } catch (err) {
      throw unavailable(err, `releasing vm ${vmUuid}`);
    }
    this.#held.delete(vmUuid);
    this.log(`released vm ${vmUuid}`);
  }

  /** Stops renewing and revokes the lease: every claim left goes at once (a clean stop). */
  async close(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    const id = this.#lease;
    this.#lease = null;
    this.#held.clear();
    if (id) await this.client.leaseClient.leaseRevoke({ ID: id }).catch(() => undefined);
  }
}
