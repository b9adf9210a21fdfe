// Transactions: a snapshot of the whole store, committed only if nothing they touched changed
// meanwhile (else EAGAIN, and the client redoes the work).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { XsType, encodeMessage, encodeStrings } from '../../src/xenstore/wire.js';
import type { XsClient } from '../../src/xenstore/client.js';
import { RawConn, connectClient, errnoOf, startDaemon, type Daemon } from './helpers.js';

let d: Daemon;
let a: XsClient;
let b: XsClient;

beforeAll(async () => {
  d = await startDaemon();
  a = await connectClient(d.socket);
  b = await connectClient(d.socket);
});
afterAll(async () => {
  await a?.close();
  await b?.close();
  await d?.stop();
});

describe('transactions', () => {
  it('reads a snapshot taken at TRANSACTION_START', async () => {
    await a.write('/tx/k', 'old');
    const tx = await a.transactionStart();
    await b.write('/tx/k', 'new');
    await b.write('/tx-other', 'meanwhile');
    expect(await a.readString('/tx/k', tx)).toBe('old');
    expect(await errnoOf(a.read('/tx-other', tx))).toBe('ENOENT');
    await a.transactionEnd(tx, false);
  });

  it('keeps its writes private until commit', async () => {
    const tx = await a.transactionStart();
    await a.write('/tx/new', 'n', tx);
    expect(await a.readString('/tx/new', tx)).toBe('n');
    expect(await errnoOf(b.read('/tx/new'))).toBe('ENOENT');
    await a.transactionEnd(tx, true);
    expect(await b.readString('/tx/new')).toBe('n');
  });

  it('fails the commit with EAGAIN when a node it read was changed', async () => {
    await a.write('/tx/c', '1');
    const tx = await a.transactionStart();
    expect(await a.readString('/tx/c', tx)).toBe('1');
    await a.write('/tx/d', 'x', tx);
    await b.write('/tx/c', '2');
    expect(await errnoOf(a.transactionEnd(tx, true))).toBe('EAGAIN');
    expect(await errnoOf(b.read('/tx/d'))).toBe('ENOENT');
    // the id is gone after END either way
    expect(await errnoOf(a.transactionEnd(tx, true))).toBe('ENOENT');
  });

  it('fails with EAGAIN when a node it created appeared meanwhile', async () => {
    const tx = await a.transactionStart();
    await a.write('/tx/race', 'mine', tx);
    await b.write('/tx/race', 'theirs');
    expect(await errnoOf(a.transactionEnd(tx, true))).toBe('EAGAIN');
    expect(await b.readString('/tx/race')).toBe('theirs');
  });

  it('commits when only unrelated nodes changed', async () => {
    await a.write('/tx/u1', '1');
    const tx = await a.transactionStart();
    await a.write('/tx/u1', '2', tx);
    await b.write('/elsewhere', 'x');
    await a.transactionEnd(tx, true);
    expect(await b.readString('/tx/u1')).toBe('2');
  });

  it('discards everything on abort', async () => {
    const tx = await a.transactionStart();
    await a.write('/tx/aborted', 'x', tx);
    await a.rm('/tx/u1', tx);
    await a.transactionEnd(tx, false);
    expect(await b.exists('/tx/aborted')).toBe(false);
    expect(await b.readString('/tx/u1')).toBe('2');
  });

  it('transaction(fn) redoes fn on EAGAIN until it commits (a counter incremented concurrently)', async () => {
    await a.write('/tx/counter', '0');
    const bump = (c: XsClient): Promise<void> =>
      c.transaction(async (tx) => {
        const n = Number(await c.readString('/tx/counter', tx));
        await new Promise((r) => setImmediate(r));
        await c.write('/tx/counter', String(n + 1), tx);
      });
    await Promise.all([...Array.from({ length: 10 }, () => bump(a)), ...Array.from({ length: 10 }, () => bump(b))]);
    expect(await a.readString('/tx/counter')).toBe('20');
  });

  it('answers a nested TRANSACTION_START with EBUSY and an unknown tx_id with ENOENT', async () => {
    const tx = await a.transactionStart();
    expect(await errnoOf(a.request(XsType.TRANSACTION_START, encodeStrings(''), tx))).toBe('EBUSY');
    expect(await errnoOf(a.read('/tx/k', tx + 1000))).toBe('ENOENT');
    // another connection cannot use this connection's transaction
    expect(await errnoOf(b.read('/tx/k', tx))).toBe('ENOENT');
    await a.transactionEnd(tx, false);
  });

  it('returns the transaction id as a decimal string in the reply payload', async () => {
    const raw = await RawConn.connect(d.socket);
    raw.send(encodeMessage(XsType.TRANSACTION_START, 3, 0, encodeStrings('')));
    const [m] = await raw.waitMessages(1);
    expect(m!.type).toBe(XsType.TRANSACTION_START);
    expect(m!.payload.toString('latin1')).toMatch(/^[1-9][0-9]*\0$/);
    raw.close();
  });

  it('forgets the transactions of a connection that closes', async () => {
    const c = await connectClient(d.socket);
    const tx = await c.transactionStart();
    await c.write('/tx/orphan', 'x', tx);
    await c.close();
    expect(await a.exists('/tx/orphan')).toBe(false);
  });
});
