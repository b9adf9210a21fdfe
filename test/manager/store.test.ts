import { describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { StoreError, blobName } from '../../src/manager/store-meta.js';
import { DirOps } from '../../src/manager/store-ops.js';
import { CLOCK_JUMP, GroupCommitStore } from '../../src/manager/store.js';
import type { AppendLog } from '../../src/manager/wal.js';
import { tempDir } from '../helpers/temp.js';

const macKey = crypto.randomBytes(32);

async function open(dir: string, table: unknown = []): Promise<GroupCommitStore> {
  return (await GroupCommitStore.open(new DirOps(dir), macKey, () => table)).store;
}

/** DirOps that counts checkpoints and log appends, to see commits being shared. */
class CountingOps extends DirOps {
  commits = 0;
  override async commit(items: ReadonlyArray<{ name: string; data: Uint8Array }>, meta: Uint8Array): Promise<void> {
    this.commits++;
    return super.commit(items, meta);
  }
  override async openLog(bytes: number): Promise<AppendLog> {
    const log = await super.openLog(bytes);
    return {
      size: log.size,
      writeSync: (d, p) => (this.commits++, log.writeSync(d, p)),
      write: (d, p) => (this.commits++, log.write(d, p)),
      close: () => log.close(),
    };
  }
}

describe('group-commit store on a directory', () => {
  it('stores and loads generations; a newer save replaces the older file', async () => {
    const d = tempDir('store');
    const s = await open(d);
    const g1 = s.reserve();
    await s.save(1, 'permanent', g1, Buffer.from('one'));
    const g2 = s.reserve();
    await s.save(1, 'permanent', g2, Buffer.from('two'));
    expect(await s.load(1, 'permanent')).toEqual({ generation: g2, data: Buffer.from('two') });
    expect(await s.load(1, 'volatile')).toBeNull();
    // Saves are in the log until a checkpoint writes the live generation as a file.
    expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob'))).toEqual([]);
    await s.checkpoint();
    expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob'))).toEqual([blobName(1, 'permanent', g2)]);
    expect(await s.load(1, 'permanent')).toEqual({ generation: g2, data: Buffer.from('two') });
    await s.remove(1);
    expect(await s.load(1, 'permanent')).toBeNull();
    await s.close();
    expect(fs.readdirSync(d).filter((f) => f.endsWith('.blob'))).toEqual([]);
  });

  it('concurrent saves share commits', async () => {
    const d = tempDir('store');
    const ops = new CountingOps(d);
    const s = (await GroupCommitStore.open(ops, macKey, () => null)).store;
    ops.commits = 0; // the start's checkpoint
    await Promise.all(Array.from({ length: 200 }, (_, i) => s.save(i + 1, 'permanent', s.reserve(), crypto.randomBytes(1024))));
    expect(s.stats.saves).toBe(200);
    expect(ops.commits).toBeLessThan(20);
    expect(s.stats.commits).toBe(ops.commits);
    for (let i = 1; i <= 200; i += 37) expect((await s.load(i, 'permanent'))!.data.length).toBe(1024);
  });

  it('a reopened store has the committed state and drops what a crash left half-done', async () => {
    const d = tempDir('store');
    const s = await open(d, [{ a: 1 }]);
    const g = s.reserve();
    await s.save(2, 'volatile', g, Buffer.from('kept'));
    // The table goes in a log record when the daemon says it changed (saves only touch lastSeen).
    await s.commitTable();
    // What a crash mid-commit leaves: a temp file and a renamed blob the metadata never named.
    fs.writeFileSync(path.join(d, `${blobName(2, 'volatile', g + 5)}.tmp`), 'torn');
    fs.writeFileSync(path.join(d, blobName(2, 'volatile', g + 6)), 'uncommitted');
    fs.writeFileSync(path.join(d, 'meta.tmp'), 'torn');
    const r = await GroupCommitStore.open(new DirOps(d), macKey, () => null);
    expect(r.table).toEqual([{ a: 1 }]);
    expect(await r.store.load(2, 'volatile')).toEqual({ generation: g, data: Buffer.from('kept') });
    expect(fs.readdirSync(d).sort()).toEqual([blobName(2, 'volatile', g), 'meta', 'wal']);
    // Generations the crashed run reserved but never committed (g + 5, g + 6 above) are never reused.
    expect(r.store.reserve()).toBe(g + CLOCK_JUMP + 1);
  });

  it('refuses metadata that was edited or written under another key', async () => {
    const d = tempDir('store');
    const s = await open(d);
    await s.save(1, 'permanent', s.reserve(), Buffer.from('x'));
    const meta = fs.readFileSync(path.join(d, 'meta'));
    expect(meta.includes('"clock":0')).toBe(true);
    const edited = Buffer.from(meta.toString('latin1').replace('"clock":0', '"clock":1'), 'latin1');
    fs.writeFileSync(path.join(d, 'meta'), edited);
    await expect(GroupCommitStore.open(new DirOps(d), macKey, () => null)).rejects.toThrow(StoreError);
    fs.writeFileSync(path.join(d, 'meta'), meta);
    await expect(GroupCommitStore.open(new DirOps(d), crypto.randomBytes(32), () => null)).rejects.toThrow(/MAC does not verify/);
  });

  it('load waits for a queued save of the same blob (read your writes)', async () => {
    const s = await open(tempDir('store'));
    const p = s.save(5, 'savestate', s.reserve(), Buffer.from('new'));
    expect((await s.load(5, 'savestate'))!.data.toString()).toBe('new');
    await p;
  });
});
