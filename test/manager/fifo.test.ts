import { afterEach, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ensureFifo, isEventLoopPipe, openReader, openWriter, writeShared, TransportError } from '../../src/manager/fifo.js';
import { PIPE_BUF } from '../../src/manager/wire.js';
import { tempDir } from '../helpers/temp.js';

const sockets: Array<{ destroy(): void }> = [];
afterEach(() => {
  for (const s of sockets.splice(0)) s.destroy();
});

describe('FIFO transport', () => {
  it('reads a FIFO on a libuv pipe handle, even while every threadpool thread is busy', async () => {
    const d = tempDir('fifo');
    const p = path.join(d, 'x.fifo');
    ensureFifo(p);
    const r = openReader(p);
    const w = openWriter(p);
    sockets.push(r, w);
    expect(isEventLoopPipe(r)).toBe(true);
    expect(isEventLoopPipe(w)).toBe(true);
    // Occupy the whole libuv pool (default 4 threads, 8 to be sure): an fs.ReadStream would now wait.
    let poolBusy = 8;
    for (let i = 0; i < 8; i++) crypto.pbkdf2('x', 'y', 1_500_000, 32, 'sha256', () => poolBusy--);
    const got = new Promise<Buffer>((resolve) => r.once('data', resolve));
    w.write(Buffer.from('ping'));
    expect((await got).toString()).toBe('ping');
    // Through the pool the read would have waited for a thread, i.e. for some of these jobs to end
    // (an fs.ReadStream gets it after ~1 s here, with 3 jobs still running); on the loop, none has.
    expect(poolBusy).toBe(8);
    while (poolBusy > 0) await new Promise((res) => setTimeout(res, 50));
  });

  it('moves a 256 KiB frame through one FIFO whole (one writer, partial writes handled by libuv)', async () => {
    const d = tempDir('fifo');
    const p = path.join(d, 'big.fifo');
    ensureFifo(p);
    const r = openReader(p);
    const w = openWriter(p);
    sockets.push(r, w);
    const blob = crypto.randomBytes(256 * 1024);
    const chunks: Buffer[] = [];
    let n = 0;
    const done = new Promise<void>((resolve) =>
      r.on('data', (c: Buffer) => {
        chunks.push(c);
        n += c.length;
        if (n >= blob.length) resolve();
      }),
    );
    w.write(blob);
    await done;
    expect(Buffer.concat(chunks).equals(blob)).toBe(true);
    expect(chunks.length).toBeGreaterThan(1);
  });

  it('refuses frames above PIPE_BUF on a shared FIFO, and says when no manager reads it', () => {
    const d = tempDir('fifo');
    const p = path.join(d, 's.fifo');
    ensureFifo(p);
    expect(() => writeShared(p, Buffer.alloc(PIPE_BUF + 1))).toThrow(TransportError);
    expect(() => writeShared(p, Buffer.alloc(10))).toThrow(/no manager is reading/);
    fs.writeFileSync(path.join(d, 'plain'), '');
    expect(() => ensureFifo(path.join(d, 'plain'))).toThrow(/not a FIFO/);
  });
});
