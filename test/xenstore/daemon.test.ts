// Daemon semantics through a real `vtpm xenstored` process: node operations, error names, and what
// happens to a connection that breaks the framing.
import { describe, expect, it } from 'vitest';
import { XsType, encodeMessage, encodeStrings } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { RawConn, daemonPerFile, errnoOf, header, hex, startDaemon, type Daemon } from './helpers.js';

let d: Daemon;
let c: XsClient;

daemonPerFile((dd, cc) => ((d = dd), (c = cc)));

describe('xenstored node operations', () => {
  it('answers a READ with the raw value bytes, echoing type, req_id and tx_id', async () => {
    await c.write('/bytes/k', 'hi');
    const raw = await RawConn.connect(d.socket);
    raw.send(Buffer.from('02000000' + '2a000000' + '00000000' + '09000000' + '2f62797465732f6b00', 'hex'));
    await raw.waitMessages(1);
    expect(hex(raw.allBytes())).toBe('02000000' + '2a000000' + '00000000' + '02000000' + '6869');
    raw.close();
  });

  it('answers an unknown node with an ERROR frame carrying "ENOENT\\0"', async () => {
    const raw = await RawConn.connect(d.socket);
    raw.send(encodeMessage(XsType.READ, 5, 0, encodeStrings('/nope')));
    await raw.waitMessages(1);
    expect(hex(raw.allBytes())).toBe('10000000' + '05000000' + '00000000' + '07000000' + Buffer.from('ENOENT\0').toString('hex'));
    raw.close();
  });

  it('writes create parents, directory lists children in creation order, rm is recursive', async () => {
    await c.write('/t1/a/b', 'x');
    await c.write('/t1/c', '');
    expect(await c.directory('/t1')).toEqual(['a', 'c']);
    expect(await c.readString('/t1/a')).toBe('');
    await c.rm('/t1/a');
    expect(await c.directory('/t1')).toEqual(['c']);
    expect(await errnoOf(c.read('/t1/a/b'))).toBe('ENOENT');
  });

  it('keeps binary values byte for byte, including NULs', async () => {
    const v = Buffer.from([0, 1, 2, 255, 0]);
    await c.write('/bin', v);
    expect(Buffer.compare(await c.read('/bin'), v)).toBe(0);
  });

  it('mkdir of an existing node is OK; rm of a missing leaf is OK unless its parent is missing', async () => {
    await c.mkdir('/t2');
    await c.mkdir('/t2');
    await c.rm('/t2/missing');
    expect(await errnoOf(c.rm('/t2/missing/deeper'))).toBe('ENOENT');
    expect(await errnoOf(c.rm('/'))).toBe('EINVAL');
  });

  it('rejects bad paths with EINVAL', async () => {
    for (const p of ['/a//b', '/a/', '', '/a b', '/a\u00e9', '@introduceDomain', '/' + 'x'.repeat(3072)]) {
      expect(await errnoOf(c.write(p, 'v')), JSON.stringify(p.slice(0, 20))).toBe('EINVAL');
    }
  });

  it('resolves a relative path from dom0 against /local/domain/0', async () => {
    await c.write('rel/key', 'v');
    expect(await c.readString('/local/domain/0/rel/key')).toBe('v');
  });

  it('reports permissions and lets dom0 set them', async () => {
    await c.write('/p/k', 'v');
    expect(await c.getPerms('/p/k')).toEqual([{ domid: 0, access: 'n' }]);
    await c.setPerms('/p/k', [{ domid: 3, access: 'r' }, { domid: 4, access: 'b' }]);
    expect(await c.getPerms('/p/k')).toEqual([
      { domid: 3, access: 'r' },
      { domid: 4, access: 'b' },
    ]);
    expect(await errnoOf(c.request(XsType.SET_PERMS, encodeStrings('/p/k', 'x3')))).toBe('EINVAL');
    expect(await errnoOf(c.request(XsType.SET_PERMS, encodeStrings('/p/k')))).toBe('EINVAL');
  });

  it('answers domain queries', async () => {
    expect(await c.getDomainPath(7)).toBe('/local/domain/7');
    expect(await c.isDomainIntroduced(0)).toBe(true);
    expect(await c.isDomainIntroduced(7)).toBe(false);
    expect(await errnoOf(c.getDomainPath(-1 as number))).toBe('EINVAL');
  });

  it('pages a long directory with DIRECTORY_PART and refuses it whole with E2BIG', async () => {
    const names = Array.from({ length: 300 }, (_, i) => `child-number-${String(i).padStart(4, '0')}`);
    await c.transaction(async (tx) => {
      for (const n of names) await c.write(`/big/${n}`, '', tx);
    });
    expect(await errnoOf(c.directory('/big'))).toBe('E2BIG');
    const got: string[] = [];
    let offset = 0;
    let gen: string | undefined;
    for (;;) {
      const part = await c.directoryPart('/big', offset);
      gen ??= part.gen;
      expect(part.gen).toBe(gen);
      got.push(...part.children);
      offset += part.children.reduce((n, s) => n + s.length + 1, 0);
      if (part.done) break;
    }
    expect(got).toEqual(names);
  });

  it('answers unsupported types with ENOSYS', async () => {
    for (const t of [XsType.CONTROL, XsType.SET_TARGET, XsType.WATCH_EVENT, XsType.ERROR, 20, 27, 0xffff, 0xffffffff]) {
      expect(await errnoOf(c.request(t, encodeStrings('x')))).toBe('ENOSYS');
    }
  });

  it('answers a missing NUL or a wrong argument count with EINVAL', async () => {
    expect(await errnoOf(c.request(XsType.READ, Buffer.from('/bytes/k')))).toBe('EINVAL');
    expect(await errnoOf(c.request(XsType.READ, encodeStrings('/bytes/k', 'extra')))).toBe('EINVAL');
    expect(await errnoOf(c.request(XsType.WRITE, Buffer.from('/no-nul')))).toBe('EINVAL');
    expect(await errnoOf(c.request(XsType.TRANSACTION_END, encodeStrings('X')))).toBe('EINVAL');
  });

  it('closes only the connection that announces a payload over 4096 bytes', async () => {
    const bad = await RawConn.connect(d.socket);
    bad.send(header(XsType.WRITE, 1, 0, 4097));
    await bad.waitClosed();
    expect(bad.messages).toHaveLength(0);
    expect(await c.readString('/bytes/k')).toBe('hi');
  });

  it('serves a 4096-byte payload, the maximum', async () => {
    const path = '/max';
    const value = Buffer.alloc(4096 - path.length - 1, 0x61);
    await c.write(path, value);
    expect((await c.read(path)).length).toBe(value.length);
  });

  it('answers a pipelined batch in order, in one write, its watch events in place and once per change', async () => {
    const raw = await RawConn.connect(d.socket);
    const other = await RawConn.connect(d.socket);
    raw.send(encodeMessage(XsType.WATCH, 1, 0, encodeStrings('/batch/k', 'T')));
    other.send(encodeMessage(XsType.WATCH, 1, 0, encodeStrings('/batch/k', 'U')));
    await raw.waitMessages(2);
    await other.waitMessages(2);
    const chunksBefore = raw.bytes.length;
    raw.send(
      Buffer.concat([
        encodeMessage(XsType.WRITE, 2, 0, Buffer.from('/batch/k\x001')),
        encodeMessage(XsType.READ, 3, 0, encodeStrings('/batch/k')),
        encodeMessage(XsType.READ, 4, 0, encodeStrings('/batch/missing')),
        encodeMessage(XsType.WRITE, 5, 0, Buffer.from('/batch/k\x002')),
      ]),
    );
    const got = (await raw.waitMessages(8)).slice(2);
    // Each WRITE's event is sent while the WRITE is handled, so it precedes that WRITE's OK.
    expect(got.map((m) => [XsType[m.type], m.reqId])).toEqual([
      ['WATCH_EVENT', 0],
      ['WRITE', 2],
      ['READ', 3],
      ['ERROR', 4],
      ['WATCH_EVENT', 0],
      ['WRITE', 5],
    ]);
    // All of them left in one write: the first chunk after the batch holds the six frames (the READ
    // answer is the 16-byte header 02000000 03000000 00000000 01000000 and "1").
    const chunk = Buffer.concat(raw.bytes.slice(chunksBefore));
    expect(raw.bytes.length - chunksBefore).toBe(1);
    expect(chunk.includes(Buffer.from('02000000' + '03000000' + '00000000' + '01000000' + '31', 'hex'))).toBe(true);
    // The other watcher hears each of the two changes once, nothing more.
    await other.waitMessages(4);
    await new Promise((r) => setTimeout(r, 50));
    expect(other.messages.slice(2).map((m) => m.payload.toString('latin1'))).toEqual(['/batch/k\0U\0', '/batch/k\0U\0']);
    raw.close();
    other.close();
  });

  it('stops cleanly on SIGTERM and removes its socket', async () => {
    const d2 = await startDaemon();
    const exited = new Promise<number | null>((r) => d2.proc.once('exit', (code) => r(code)));
    d2.proc.kill('SIGTERM');
    expect(await exited).toBe(0);
    const fs = await import('node:fs');
    expect(fs.existsSync(d2.socket)).toBe(false);
    await d2.stop();
  });
});

describe('xenstore client batching', () => {
  it('holds a tick\'s requests for one write, and flush() hands them to the kernel at once', async () => {
    const sock = (c as unknown as { socket: import('node:net').Socket }).socket;
    const a = c.write('/flush/a', '1');
    const b = c.write('/flush/b', '2');
    // Batched: both wait in the corked socket until the end of the tick...
    expect(sock.writableCorked).toBe(1);
    expect(sock.writableLength).toBeGreaterThan(0);
    // ...unless flushed, before synchronous work (a hypercall) that would hold them back.
    c.flush();
    expect(sock.writableCorked).toBe(0);
    expect(sock.writableLength).toBe(0);
    await Promise.all([a, b]);
    expect(await c.readString('/flush/b')).toBe('2');
  });
});
