// The XenStore daemon: xs_wire over UNIX sockets. The main socket is dom0 (privileged, the toolstack);
// INTRODUCE of domain N opens DIR/dom<N>.sock, and whoever connects there *is* domain N: a
// connection's domid comes from the socket it arrived on, never from anything it sends. Requests are
// answered in order, one connection at a time; a framing violation closes that connection alone.
import net from 'node:net';
import fs from 'node:fs';
import {
  ABS_PATH_MAX,
  PAYLOAD_MAX,
  REL_PATH_MAX,
  XsError,
  XsType,
  encodeMessage,
  encodeStrings,
  encodeWatchEvent,
  splitStrings,
  splitWrite,
  typeName,
  type XsErrno,
  type XsMessage,
} from './wire.js';
import { DOMID_MAX, formatPerm, parsePerms } from './permissions.js';
import { domainSocketPath } from './client.js';
import { Connection, OutputBatch, type ConnectionHost, type Watch } from './connection.js';
import { closeServer, listen, rmSocket } from './socket-files.js';
import { CaptureFeed } from './capture-feed.js';
import { DEFAULT_QUOTAS, Store, type Change, type Quotas, type Transaction } from './store.js';
import { escapeLogLine } from '../util/log-escape.js';
import { xenstoreMetrics } from '../util/metrics.js';

export interface DaemonOptions {
  /** The dom0 socket (what XENSTORED_PATH points at). */
  socket: string;
  /** Where INTRODUCE creates dom<N>.sock. */
  domainSocketDir: string;
  quotas?: Partial<Quotas>;
  /** Diagnostics (connection closed for a protocol violation, …). */
  log?: (line: string) => void;
  /**
   * Domains run under their own uids (docs/isolation.md): dom<N>.sock is then owned by uid/gid
   * domainUidBase + N, mode 0600, so only dom<N>'s processes (and root) can connect to it.
   */
  domainUidBase?: number;
}

/** Special watch paths: not nodes; they fire on domain introduction and release. */
const INTRODUCE_WATCH = '@introduceDomain';
const RELEASE_WATCH = '@releaseDomain';

interface Domain {
  readonly domid: number;
  readonly socketPath: string;
  readonly server: net.Server;
  readonly conns: Set<Connection>;
}

const OK = encodeStrings('OK');
const DOMID_RE = /^(0|[1-9][0-9]{0,4})$/;
const PATH_CHARS = /^[A-Za-z0-9\-/_@]+$/;

export class XenstoreDaemon implements ConnectionHost {
  readonly store: Store;
  readonly quotas: Quotas;
  private readonly main: net.Server;
  private readonly domains = new Map<number, Domain>();
  private readonly conns = new Set<Connection>();
  private readonly log: (line: string) => void;
  readonly output = new OutputBatch();
  /** dom0's copies of a guest's own xs_wire traffic, for its capture (capture-feed.ts). */
  private readonly feed: CaptureFeed;

  constructor(private readonly opts: DaemonOptions) {
    this.quotas = { ...DEFAULT_QUOTAS, ...opts.quotas };
    this.store = new Store(this.quotas);
    this.store.onChange = (changes) => this.fireWatches(changes);
    const sink = opts.log;
    this.log = sink ? (l) => sink(escapeLogLine(l)) : () => {};
    this.main = net.createServer((s) => this.accept(s, 0));
    this.feed = new CaptureFeed(opts.socket, (domid) => this.retap(domid), this.log);
  }

  /** Listen on the dom0 socket (a stale socket file from a previous run is replaced). */
  async start(): Promise<void> {
    fs.mkdirSync(this.opts.domainSocketDir, { recursive: true });
    await listen(this.main, this.opts.socket);
    await this.feed.start();
    // an accept failure (EMFILE, …) must not take the daemon down
    this.main.on('error', (err) => this.log(`dom0 socket: ${err.message}`));
  }

  /** Close every socket and connection; remove the socket files. */
  async stop(): Promise<void> {
    for (const c of [...this.conns]) this.kill(c);
    const closing = [closeServer(this.main), this.feed.stop()];
    for (const d of this.domains.values()) closing.push(closeServer(d.server));
    await Promise.all(closing);
    for (const d of this.domains.values()) rmSocket(d.socketPath);
    this.domains.clear();
    rmSocket(this.opts.socket);
  }

  private accept(socket: net.Socket, domid: number): void {
    const c = new Connection(this, socket, domid);
    if (domid !== 0) c.tap = this.feed.tapFor(domid);
    this.conns.add(c);
    this.domains.get(domid)?.conns.add(c);
  }

  /** A guest's capture started or stopped: its connections' taps follow. */
  private retap(domid: number): void {
    const tap = this.feed.tapFor(domid);
    for (const c of this.domains.get(domid)?.conns ?? []) c.tap = tap;
  }

  /** Close one connection, forgetting its watches and transactions; others are untouched. */
  kill(c: Connection, why?: string): void {
    if (c.closed) return;
    c.closed = true;
    if (why) this.log(`closing dom${c.domid} connection: ${why}`);
    if (why && c.cutOffReason) xenstoreMetrics().cutOff.inc({ reason: c.cutOffReason });
    for (const tx of c.txs.values()) this.store.dropTransaction(tx);
    c.txs.clear();
    c.watches.clear();
    this.conns.delete(c);
    this.domains.get(c.domid)?.conns.delete(c);
    c.socket.destroy();
  }

  // ---- dispatch -----------------------------------------------------------------------------------

  /** Answer one request; returns a promise only for requests that must wait (INTRODUCE, RELEASE). */
  handle(c: Connection, m: XsMessage): Promise<void> | undefined {
    // Refusals (ENOENT of a probing READ, EACCES, ...) are answers, not bugs: building their stack
    // traces cost more than the request itself.
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    xenstoreMetrics().requests.inc({ type: XsType[m.type] ?? 'unknown' });
    try {
      const r = this.dispatch(c, m);
      if (r instanceof Promise) {
        return r.then(
          (payload) => this.reply(c, m, payload),
          (err: unknown) => this.replyError(c, m, err),
        );
      }
      if (r) this.reply(c, m, r.payload, r.after);
    } catch (err) {
      this.replyError(c, m, err);
    } finally {
      Error.stackTraceLimit = limit;
    }
    return undefined;
  }

  private reply(c: Connection, m: XsMessage, payload: Buffer, after?: () => void): void {
    if (payload.length > PAYLOAD_MAX) return this.replyError(c, m, new XsError('E2BIG'));
    c.reply(encodeMessage(m.type, m.reqId, m.txId, payload));
    after?.();
  }

  private replyError(c: Connection, m: XsMessage, err: unknown): void {
    let code: XsErrno = 'EIO';
    if (err instanceof XsError) code = err.code;
    else this.log(`internal error on ${typeName(m.type)}: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
    c.reply(encodeMessage(XsType.ERROR, m.reqId, m.txId, encodeStrings(code)));
  }

  private dispatch(
    c: Connection,
    m: XsMessage,
  ): { payload: Buffer; after?: () => void } | Promise<Buffer> | undefined {
    switch (m.type) {
      case XsType.READ: {
        const tx = this.tx(c, m);
        return { payload: this.store.read(c, this.nodePath(c, oneArg(m)), tx) };
      }
      case XsType.DIRECTORY: {
        const tx = this.tx(c, m);
        const names = this.store.directory(c, this.nodePath(c, oneArg(m)), tx);
        return { payload: names.length ? encodeStrings(...names) : Buffer.alloc(0) };
      }
      case XsType.DIRECTORY_PART:
        return { payload: this.directoryPart(c, m) };
      case XsType.GET_PERMS: {
        const tx = this.tx(c, m);
        const perms = this.store.getPerms(c, this.nodePath(c, oneArg(m)), tx);
        return { payload: encodeStrings(...perms.map(formatPerm)) };
      }
      case XsType.WRITE: {
        const tx = this.tx(c, m);
        const w = splitWrite(m.payload);
        if (!w) throw new XsError('EINVAL', 'WRITE without NUL after the path');
        this.store.write(c, this.nodePath(c, w.path), w.value, tx);
        return { payload: OK };
      }
      case XsType.MKDIR: {
        const tx = this.tx(c, m);
        this.store.mkdir(c, this.nodePath(c, oneArg(m)), tx);
        return { payload: OK };
      }
      case XsType.RM: {
        const tx = this.tx(c, m);
        this.store.rm(c, this.nodePath(c, oneArg(m)), tx);
        return { payload: OK };
      }
      case XsType.SET_PERMS: {
        const tx = this.tx(c, m);
        const args = strings(m);
        if (args.length < 2) throw new XsError('EINVAL', 'SET_PERMS needs a path and at least one permission');
        const perms = parsePerms(args.slice(1));
        if (!perms) throw new XsError('EINVAL', 'bad permission string');
        this.store.setPerms(c, this.nodePath(c, args[0]!), perms, tx);
        return { payload: OK };
      }
      case XsType.WATCH:
        return this.watch(c, m);
      case XsType.UNWATCH: {
        const args = strings(m);
        if (args.length !== 2) throw new XsError('EINVAL', 'UNWATCH needs path and token');
        const abs = this.watchPath(c, args[0]!);
        if (!c.watches.delete(watchKey(abs, args[1]!))) throw new XsError('ENOENT', 'no such watch');
        return { payload: OK };
      }
      case XsType.TRANSACTION_START: {
        if (m.txId !== 0) throw new XsError('EBUSY', 'nested transaction');
        if (!c.privileged && this.domainTxCount(c.domid) >= this.quotas.transactions) {
          throw new XsError('ENOSPC', `dom${c.domid} transaction quota ${this.quotas.transactions}`);
        }
        const tx = this.store.startTransaction(c);
        c.txs.set(tx.id, tx);
        return { payload: encodeStrings(String(tx.id)) };
      }
      case XsType.TRANSACTION_END: {
        const arg = oneArg(m);
        if (arg !== 'T' && arg !== 'F') throw new XsError('EINVAL', 'TRANSACTION_END takes T or F');
        const tx = this.tx(c, m);
        if (!tx) throw new XsError('ENOENT', 'no transaction');
        c.txs.delete(tx.id);
        this.store.endTransaction(tx, arg === 'T');
        return { payload: OK };
      }
      case XsType.INTRODUCE:
        return this.introduce(c, m);
      case XsType.RELEASE:
        return this.release(c, m);
      case XsType.GET_DOMAIN_PATH:
        return { payload: encodeStrings(`/local/domain/${parseDomid(oneArg(m))}`) };
      case XsType.IS_DOMAIN_INTRODUCED: {
        if (!c.privileged) throw new XsError('EACCES', 'IS_DOMAIN_INTRODUCED is for dom0');
        const domid = parseDomid(oneArg(m));
        return { payload: encodeStrings(domid === 0 || this.domains.has(domid) ? 'T' : 'F') };
      }
      case XsType.RESET_WATCHES: {
        c.watches.clear();
        for (const tx of c.txs.values()) this.store.dropTransaction(tx);
        c.txs.clear();
        return { payload: OK };
      }
      default:
        throw new XsError('ENOSYS', `unsupported message type ${m.type}`);
    }
  }

  /** The transaction named by the header (ENOENT if it is not one of this connection's). */
  private tx(c: Connection, m: XsMessage): Transaction | undefined {
    if (m.txId === 0) return undefined;
    const tx = c.txs.get(m.txId);
    if (!tx) throw new XsError('ENOENT', `no transaction ${m.txId}`);
    return tx;
  }

  private domainTxCount(domid: number): number {
    let n = 0;
    for (const c of this.domains.get(domid)?.conns ?? []) n += c.txs.size;
    return n;
  }

  private domainWatchCount(domid: number): number {
    let n = 0;
    for (const c of this.domains.get(domid)?.conns ?? []) n += c.watches.size;
    return n;
  }

  /** Canonical absolute node path: relative paths hang off the caller's /local/domain/<domid>. */
  nodePath(c: Connection, raw: string): string {
    if (raw.length === 0 || raw.startsWith('@')) throw new XsError('EINVAL', `bad path "${raw}"`);
    const relative = !raw.startsWith('/');
    if (raw.length > (relative ? REL_PATH_MAX : ABS_PATH_MAX)) throw new XsError('EINVAL', 'path too long');
    const abs = relative ? `${c.home}/${raw}` : raw;
    if (!PATH_CHARS.test(abs) || abs.includes('//') || (abs.length > 1 && abs.endsWith('/'))) {
      throw new XsError('EINVAL', `bad path "${raw}"`);
    }
    if (!c.privileged) {
      // quota on path length counts what lies beyond a domain's home, as C xenstored does
      const base = /^\/local\/domain\/[0-9]+/.exec(abs)?.[0].length ?? 0;
      if (abs.length - base > this.quotas.pathLength) throw new XsError('EINVAL', 'path over the length quota');
    }
    return abs;
  }

  private watchPath(c: Connection, raw: string): string {
    if (raw === INTRODUCE_WATCH || raw === RELEASE_WATCH) return raw;
    return this.nodePath(c, raw);
  }

  // ---- watches ------------------------------------------------------------------------------------

  private watch(c: Connection, m: XsMessage): { payload: Buffer; after: () => void } {
    const args = strings(m);
    // a third argument is the optional watch depth (WATCHDEPTH feature), not advertised: reject it
    if (args.length !== 2) throw new XsError('EINVAL', 'WATCH needs path and token');
    const [given, token] = args as [string, string];
    const abs = this.watchPath(c, given);
    const key = watchKey(abs, token);
    if (c.watches.has(key)) throw new XsError('EEXIST', 'duplicate watch');
    if (!c.privileged && this.domainWatchCount(c.domid) >= this.quotas.watches) {
      throw new XsError('E2BIG', `dom${c.domid} watch quota ${this.quotas.watches}`);
    }
    c.watches.set(key, { given, abs, token });
    // the registration event goes out right after the OK, with the path as the client gave it
    return { payload: OK, after: () => this.watchEvent(c, encodeWatchEvent(given, token)) };
  }

  private fireWatches(changes: Change[]): void {
    for (const c of this.conns) {
      if (c.watches.size === 0) continue;
      const sent = new Set<string>();
      for (const ch of changes) {
        if (!c.privileged && !this.store.canSee(c.domid, ch.perms) && !(ch.oldPerms && this.store.canSee(c.domid, ch.oldPerms))) continue;
        for (const w of c.watches.values()) {
          let epath: string | undefined;
          if (w.abs.startsWith('@')) continue;
          if (ch.path === w.abs || w.abs === '/' || ch.path.startsWith(w.abs + '/')) epath = ch.path;
          else if (ch.removed && w.abs.startsWith(ch.path + '/')) epath = w.abs;
          if (epath === undefined) continue;
          const shown = this.shownPath(c, w, epath);
          const key = watchKey(shown, w.token);
          if (sent.has(key)) continue; // identical events of one modification are coalesced
          sent.add(key);
          this.watchEvent(c, encodeWatchEvent(shown, w.token));
        }
      }
    }
  }

  private watchEvent(c: Connection, event: Buffer): void {
    xenstoreMetrics().watchEvents.inc();
    c.send(event);
  }

  /** A relative watch reports paths relative to the watcher's home when they lie under it. */
  private shownPath(c: Connection, w: Watch, epath: string): string {
    if (w.given.startsWith('/')) return epath;
    const prefix = c.home + '/';
    return epath.startsWith(prefix) ? epath.slice(prefix.length) : epath;
  }

  private fireSpecial(name: string): void {
    for (const c of this.conns) {
      // special watches report domain life cycle, which only the toolstack (dom0) may observe
      if (!c.privileged) continue;
      for (const w of c.watches.values()) if (w.abs === name) this.watchEvent(c, encodeWatchEvent(name, w.token));
    }
  }

  // ---- domains ------------------------------------------------------------------------------------

  private async introduce(c: Connection, m: XsMessage): Promise<Buffer> {
    if (!c.privileged) throw new XsError('EACCES', 'INTRODUCE is for dom0');
    const args = strings(m);
    if (args.length !== 3) throw new XsError('EINVAL', 'INTRODUCE needs domid, gfn, evtchn');
    const domid = parseDomid(args[0]!);
    if (domid === 0) throw new XsError('EINVAL', 'dom0 is always there');
    if (!/^[0-9]{1,20}$/.test(args[1]!) || !/^[0-9]{1,10}$/.test(args[2]!)) throw new XsError('EINVAL', 'bad gfn or evtchn');
    if (this.domains.has(domid)) return OK; // re-introduction is harmless
    const socketPath = domainSocketPath(this.opts.domainSocketDir, domid);
    const server = net.createServer((s) => this.accept(s, domid));
    const dom: Domain = { domid, socketPath, server, conns: new Set() };
    this.domains.set(domid, dom);
    try {
      const base = this.opts.domainUidBase;
      await listen(server, socketPath, base === undefined ? undefined : base + domid);
      server.on('error', (err) => this.log(`dom${domid} socket: ${err.message}`));
    } catch (err) {
      this.domains.delete(domid);
      throw new XsError('EIO', `cannot listen on ${socketPath}: ${err instanceof Error ? err.message : String(err)}`);
    }
    this.store.ensureDomainHome(domid);
    queueMicrotask(() => this.fireSpecial(INTRODUCE_WATCH));
    return OK;
  }

  private async release(c: Connection, m: XsMessage): Promise<Buffer> {
    if (!c.privileged) throw new XsError('EACCES', 'RELEASE is for dom0');
    const domid = parseDomid(oneArg(m));
    const dom = this.domains.get(domid);
    if (!dom) throw new XsError('ENOENT', `dom${domid} was not introduced`);
    this.domains.delete(domid);
    for (const gc of [...dom.conns]) this.kill(gc, `dom${domid} released`);
    await closeServer(dom.server);
    rmSocket(dom.socketPath);
    this.store.removeDomainNodes(domid);
    queueMicrotask(() => this.fireSpecial(RELEASE_WATCH));
    return OK;
  }

  private directoryPart(c: Connection, m: XsMessage): Buffer {
    const tx = this.tx(c, m);
    const args = strings(m);
    if (args.length !== 2 || !/^[0-9]{1,10}$/.test(args[1]!)) throw new XsError('EINVAL', 'DIRECTORY_PART needs path and offset');
    const { gen, children } = this.store.directoryWithGen(c, this.nodePath(c, args[0]!), tx);
    const list = children.length ? encodeStrings(...children) : Buffer.alloc(0);
    const genBuf = encodeStrings(String(gen));
    const off = Number(args[1]);
    // offset is a byte offset into the NUL-separated child list; the reply ends with an empty string
    // (an extra NUL, i.e. an empty name, marks the last part)
    if (off >= list.length) return Buffer.concat([genBuf, Buffer.from([0])]);
    const max = PAYLOAD_MAX - genBuf.length - 1;
    let end = off;
    while (end < list.length) {
      const nul = list.indexOf(0, end);
      if (nul + 1 - off > max) break;
      end = nul + 1;
    }
    if (end === off) throw new XsError('EINVAL', 'offset is not at a child name');
    const last = end === list.length ? Buffer.from([0]) : Buffer.alloc(0);
    return Buffer.concat([genBuf, list.subarray(off, end), last]);
  }
}

/** One NUL-terminated string filling the payload (EINVAL otherwise). */
function oneArg(m: XsMessage): string {
  const s = splitStrings(m.payload);
  if (!s || s.length !== 1) throw new XsError('EINVAL', 'expected one NUL-terminated argument');
  return s[0]!;
}

function strings(m: XsMessage): string[] {
  const s = splitStrings(m.payload);
  if (!s) throw new XsError('EINVAL', 'payload is not NUL-terminated');
  return s;
}

function parseDomid(s: string): number {
  if (!DOMID_RE.test(s)) throw new XsError('EINVAL', `bad domid "${s}"`);
  const d = Number(s);
  if (d > DOMID_MAX) throw new XsError('EINVAL', `domid ${d} out of range`);
  return d;
}

function watchKey(path: string, token: string): string {
  return `${path}\0${token}`;
}
