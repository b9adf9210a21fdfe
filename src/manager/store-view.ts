// The group-commit store's in-memory view (store.ts): which generation of each blob is live, the blobs
// only the log holds (saved or appended to since the last checkpoint), and how one log record (or one
// committed batch) changes that view.
import { blobKey, nameOf, type MetaRecord } from './store-meta.js';
import { chainBytes } from './chain.js';
import type { StoreOps } from './store-ops.js';
import { replay, walKey, type WalRecord } from './wal.js';
import { managerMetrics } from '../util/metrics.js';

/** A blob in memory: `data` (a bare envelope or a chain, chain.ts) followed by the sealed `pieces` appended since. */
export interface Dirty {
  generation: number;
  data: Uint8Array;
  pieces: readonly Uint8Array[];
}

export interface View {
  blobs: Record<string, number>;
  /** Saved or appended to since the last checkpoint: the only durable copy is in the log. */
  dirty: Map<string, Dirty>;
  /** Volatile blobs already in files, kept in memory so that pieces can be appended to them. */
  kept: Map<string, Dirty>;
  table: unknown;
  clock: number;
}

/** The bytes of a blob in memory as one file holds them. */
export function materialize(d: Dirty): Uint8Array {
  return chainBytes(d.data, d.pieces);
}

/** The in-memory copy of the live blob `k` at generation `g`, if there is one. */
export function inMemory(view: Pick<View, 'dirty' | 'kept'>, k: string, g: number | undefined): Dirty | undefined {
  const d = view.dirty.get(k) ?? view.kept.get(k);
  return d && d.generation === g ? d : undefined;
}

/**
 * Applies one replayed record (or a committed batch) to a view: saves, removals, appends, table, clock.
 * An append applies only onto the generation it names, with that blob in memory; why any did not is
 * returned (a committed batch was checked before it was written, so only a replay can skip one).
 */
export function applyRecord(r: WalRecord, view: View): string[] {
  for (const s of r.saves) {
    const k = blobKey(s.instance, s.kind);
    view.blobs[k] = s.generation;
    view.dirty.set(k, { generation: s.generation, data: s.data, pieces: [] });
    view.kept.delete(k);
  }
  for (const x of r.removes) {
    const k = blobKey(x.instance, x.kind);
    delete view.blobs[k];
    view.dirty.delete(k);
    view.kept.delete(k);
  }
  const skipped: string[] = [];
  for (const a of r.appends ?? []) {
    const k = blobKey(a.instance, a.kind);
    const src = inMemory(view, k, a.onto);
    if (view.blobs[k] !== a.onto || !src) {
      skipped.push(`a piece for ${k} onto generation ${a.onto} (the blob is at ${view.blobs[k] ?? 'none'})`);
      continue;
    }
    view.blobs[k] = a.generation;
    view.dirty.set(k, { generation: a.generation, data: src.data, pieces: [...src.pieces, a.data] });
    view.kept.delete(k);
  }
  if (r.table !== undefined) view.table = r.table;
  view.clock = Math.max(view.clock, r.clock, ...r.saves.map((s) => s.generation), ...(r.appends ?? []).map((a) => a.generation));
  return skipped;
}

/**
 * Replays the log onto `view` (the checkpoint `ck` as loaded): the records of the checkpoint's log
 * generation, then of the next one, written while that checkpoint was under way (a generation after
 * that needs this checkpoint durable first, so the metadata would name it).
 */
export async function replayLog(ops: StoreOps, macKey: Buffer, ck: MetaRecord, view: View): Promise<{ replayed: number; replayStop: string }> {
  const log = await ops.readLog();
  if (!log) return { replayed: 0, replayStop: 'no log' };
  const key = walKey(macKey);
  const stops: string[] = [];
  let replayed = 0;
  for (const gen of [ck.walGen, ck.walGen + 1]) {
    const base = (gen % 2) * ck.walHalf;
    const r = replay(log.subarray(Math.min(base, log.length), Math.min(base + ck.walHalf, log.length)), key, gen);
    const skipped: string[] = [];
    for (const rec of r.records) {
      // A piece appended onto a blob of the checkpoint: that blob's file is its base.
      for (const a of rec.appends ?? []) {
        const k = blobKey(a.instance, a.kind);
        if (view.blobs[k] !== a.onto || inMemory(view, k, a.onto)) continue;
        const data = await ops.readBlob(nameOf(k, a.onto));
        if (data) view.kept.set(k, { generation: a.onto, data, pieces: [] });
      }
      skipped.push(...applyRecord(rec, view));
    }
    replayed += r.records.length;
    stops.push(`generation ${gen}: ${r.stop}${skipped.length ? `; skipped ${skipped.join(', ')}` : ''}`);
  }
  return { replayed, replayStop: stops.join('; ') };
}

/** A group commit made durable (`kind`: a log record, a checkpoint, or one etcd transaction), for the metrics. */
export function observeCommit(kind: 'log' | 'checkpoint' | 'etcd', ops: number, saves: number): void {
  const m = managerMetrics();
  m.commits.inc({ kind });
  m.groupSize.observe(ops);
  m.saves.inc(saves);
}
