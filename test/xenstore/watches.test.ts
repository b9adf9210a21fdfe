// Watches: the registration event right after the OK, events for a subtree, removed ancestors,
// relative paths for guests, and no events about nodes a guest cannot read.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { XsType, encodeMessage, encodeStrings } from '../../src/xenstore/wire.js';
import type { WatchEvent, XsClient } from '../../src/xenstore/client.js';
import { RawConn, connectClient, errnoOf, hex, startDaemon, type Daemon } from './helpers.js';

let d: Daemon;
let c: XsClient;
let w: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  c = await connectClient(d.socket);
  w = await connectClient(d.socket);
});
afterAll(async () => {
  await c?.close();
  await w?.close();
  await d?.stop();
});

/**
 * Make sure every event already sent to `watcher` arrived: the daemon wrote them before the reply to
 * the change that caused them, and it answers `watcher`'s own request after that, on the same stream.
 */
const settle = async (watcher: XsClient = w): Promise<void> => {
  await watcher.getDomainPath(0);
};

describe('watches', () => {
  it('replies OK and then fires once with the watched path (bytes)', async () => {
    const raw = await RawConn.connect(d.socket);
    raw.send(encodeMessage(XsType.WATCH, 9, 0, encodeStrings('/w', 't')));
    await raw.waitMessages(2);
    expect(hex(raw.allBytes())).toBe(
      '04000000' + '09000000' + '00000000' + '03000000' + '4f4b00' + // WATCH reply "OK\0"
        '0f000000' + '00000000' + '00000000' + '05000000' + '2f770074' + '00', // WATCH_EVENT "/w\0t\0"
    );
    raw.close();
  });

  it('fires for the node and every descendant, with the changed path', async () => {
    const seen: string[] = [];
    const watch = await w.watch('/w1', (ev) => seen.push(ev.path));
    await c.write('/w1', 'a');
    await c.write('/w1/x/y', 'b');
    await c.write('/w1-sibling', 'not under /w1');
    await c.setPerms('/w1/x', [{ domid: 0, access: 'r' }]);
    await c.rm('/w1/x');
    await settle();
    expect(seen).toEqual(['/w1', '/w1', '/w1/x/y', '/w1/x', '/w1/x']);
    await watch.close();
    await c.write('/w1', 'after unwatch');
    await settle();
    expect(seen).toHaveLength(5);
  });

  it('reports the watched path itself when an ancestor is removed', async () => {
    await c.write('/anc/deep/node', 'v');
    const seen: string[] = [];
    await w.watch('/anc/deep/node', (ev) => seen.push(ev.path));
    await c.rm('/anc');
    await settle();
    expect(seen).toEqual(['/anc/deep/node', '/anc/deep/node']);
  });

  it('delivers events through the async iterator', async () => {
    const watch = await w.watch('/iter');
    const got: WatchEvent[] = [];
    const reader = (async () => {
      for await (const ev of watch) {
        got.push(ev);
        if (got.length === 3) break;
      }
    })();
    await c.write('/iter/a', '1');
    await c.write('/iter/b', '2');
    await reader;
    expect(got.map((e) => e.path)).toEqual(['/iter', '/iter/a', '/iter/b']);
    expect(got[0]!.token).toBe(watch.token);
  });

  it('refuses a duplicate path+token with EEXIST and an unknown one on UNWATCH with ENOENT', async () => {
    await w.request(XsType.WATCH, encodeStrings('/dup', 'tok'));
    expect(await errnoOf(w.request(XsType.WATCH, encodeStrings('/dup', 'tok')))).toBe('EEXIST');
    await w.request(XsType.WATCH, encodeStrings('/dup', 'tok2'));
    expect(await errnoOf(w.request(XsType.UNWATCH, encodeStrings('/dup', 'nope')))).toBe('ENOENT');
    expect(await errnoOf(w.request(XsType.WATCH, encodeStrings('/bad//path', 'tok')))).toBe('EINVAL');
  });

  it('gives guests relative event paths for relative watches and hides unreadable nodes', async () => {
    await c.introduce(3);
    const g = await connectClient(d.domSocket(3));
    const rel: string[] = [];
    const abs: string[] = [];
    await g.watch('device', (ev) => rel.push(ev.path));
    await g.watch('/shared', (ev) => abs.push(ev.path));
    await g.write('device/vtpm/0/state', '1');
    await c.write('/shared/secret', 'dom0 only');
    await c.write('/shared/open', 'for all');
    await c.setPerms('/shared/open', [{ domid: 0, access: 'r' }]);
    await settle(g);
    expect(rel).toEqual(['device', 'device/vtpm/0/state']);
    // the registration event and the perms change that made /shared/open readable
    expect(abs).toEqual(['/shared', '/shared/open']);
    await g.close();
  });

  it('RESET_WATCHES drops every watch of the connection', async () => {
    const x = await connectClient(d.socket);
    const seen: string[] = [];
    await x.watch('/reset', (ev) => seen.push(ev.path));
    await x.resetWatches();
    await c.write('/reset/k', 'v');
    await settle(x);
    expect(seen).toEqual(['/reset']);
    await x.close();
  });

  it('tells whether a READ is answered: an event that comes before its reply is covered by it', async () => {
    await c.write('/cov', 'a');
    const seen: boolean[] = [];
    // WATCH and READ leave in one batch: the registration event comes between their replies.
    let readId = 0;
    const watch = w.watch('/cov', () => seen.push(w.answered(readId)));
    const read = w.readString('/cov');
    readId = w.lastRequestId;
    expect(w.answered(readId)).toBe(false);
    expect(await read).toBe('a');
    expect(w.answered(readId)).toBe(true);
    // The registration event arrived while the READ was outstanding.
    expect(seen).toEqual([false]);
    // A change after the reply: the READ no longer covers it.
    await c.write('/cov', 'b');
    await settle();
    expect(seen).toEqual([false, true]);
    await (await watch).close();
  });

  it('fires transaction changes only on commit', async () => {
    const seen: string[] = [];
    await w.watch('/txw', (ev) => seen.push(ev.path));
    const tx = await c.transactionStart();
    await c.write('/txw/a', '1', tx);
    await settle();
    expect(seen).toEqual(['/txw']);
    await c.transactionEnd(tx, true);
    await settle();
    expect(seen).toEqual(['/txw', '/txw/a']);
  });
});
