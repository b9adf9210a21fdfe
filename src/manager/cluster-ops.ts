// The manager's steps that need the cluster's view when its state lives in etcd (docs/cluster.md):
// the VM table as etcd has it now, a claim before an OPEN or DELETE, and cluster-wide instance numbers.
import type { EtcdStore } from './etcd-store.js';
import { MAX_INSTANCE, type VmTable } from './vm-table.js';
import { Refusal, type Reply } from './refusal.js';
import { Status } from './wire.js';

/** The table as etcd holds it now, keeping our own record of each VM this host has claimed. */
export async function refreshTable(cluster: EtcdStore, table: VmTable): Promise<void> {
  const fresh = await cluster.readTable();
  table.replace(fresh.map((r) => (cluster.claims.leaseOf(r.vmUuid) ? (table.byUuid(r.vmUuid) ?? r) : r)));
}

/**
 * OPEN on a cluster: claim the VM (refused while another host holds it), read the table as it is now
 * (unless the caller just did), and for a new VM take an instance number no host has (instance numbers
 * are cluster-wide).
 */
export async function claimForOpen(cluster: EtcdStore, table: VmTable, vmUuid: string, want: number, opts: { refreshed?: boolean } = {}): Promise<number> {
  await cluster.claims.claim(vmUuid);
  if (!opts.refreshed) await refreshTable(cluster, table);
  cluster.checkNotDamaged(vmUuid);
  const known = table.byUuid(vmUuid);
  if (known) return known.instance;
  if (want !== 0) {
    table.freeInstance(want);
    if (await cluster.reserveInstance(want, vmUuid)) return want;
    throw new Refusal(Status.BAD_PARAMETER, `instance ${want} is taken in ${cluster.description}`);
  }
  // The lowest number neither in the table nor reserved by a host that has not written its VM yet.
  for (let n = 1, tries = 0; n <= MAX_INSTANCE && tries < 100; n++) {
    if (table.byInstance(n)) continue;
    if (await cluster.reserveInstance(n, vmUuid)) return n;
    tries++;
  }
  throw new Refusal(Status.RESOURCES, `no free instance number found in ${cluster.description}`);
}

export async function deleteInCluster(cluster: EtcdStore, table: VmTable, inst: number, log: (line: string) => void): Promise<Reply> {
  await refreshTable(cluster, table);
  const r = table.byInstance(inst);
  if (!r) throw new Refusal(Status.BAD_PARAMETER, `DELETE of instance ${inst}, which is not there`);
  await cluster.claims.claim(r.vmUuid);
  await cluster.deleteVm(r.vmUuid, inst);
  table.delete(inst);
  log(`deleted instance ${inst} (vm ${r.vmUuid}) and its state from ${cluster.description}`);
  return { status: Status.SUCCESS };
}
