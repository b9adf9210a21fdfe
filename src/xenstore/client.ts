// A promise-based XenStore client over a UNIX socket (the dom0 socket, or DIR/dom<N>.sock for a guest).
// Requests may be pipelined; replies are matched by req_id. Watch events arrive as callbacks and/or an
// async iterator per watch. `transaction(fn)` reruns fn until the commit does not hit EAGAIN.
import net from 'node:net';
import {
  XsError,
  XsReceiver,
  XsType,
  encodeMessage,
  encodeStrings,
  encodeWrite,
  isXsErrno,
  splitStrings,
  type XsMessage,
} from './wire.js';
import { formatPerm, parsePerm, type Perm } from './permissions.js';
import { trace, tracing } from '../util/trace.js';

export type { Perm } from './permissions.js';
export { XsError } from './wire.js';

/** A transaction id as returned by transactionStart (0 = no transaction). */
export type TxId = number;

/** One watch firing: the path that changed (or the watched path itself) and the watch's token. */
export interface WatchEvent {
  readonly path: string;
  readonly token: string;
}

interface Pending {
  type: number;
  resolve: (payload: Buffer) => void;
  reject: (err: Error) => void;
}

/** A registered watch: events go to the callback (if any) and to async iterators over it. */
export class XsWatch implements AsyncIterable<WatchEvent> {
  private readonly buffered: WatchEvent[] = [];
  private readonly waiters: Array<(r: IteratorResult<WatchEvent>) => void> = [];
  private ended = false;

  constructor(
    private readonly client: XsClient,
    /** The path as registered (relative or absolute or @special). */
    readonly path: string,
    readonly token: string,
    private readonly onEvent?: (ev: WatchEvent) => void,
  ) {}

  /** @internal delivery from the client */
  deliver(ev: WatchEvent): void {
    if (this.ended) return;
    this.onEvent?.(ev);
    const w = this.waiters.shift();
    if (w) w({ value: ev, done: false });
    else if (!this.onEvent) this.buffered.push(ev);
  }

  /** Whether events still come (not closed, connection not gone). */
  get active(): boolean {
    return !this.ended;
  }

  /** @internal no more events (unwatched or connection closed) */
  end(): void {
    this.ended = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
  }

  /** Unregister (UNWATCH) and end iteration. */
  async close(): Promise<void> {
    if (this.ended) return;
    this.end();
    if (!this.client.closed) await this.client.unwatch(this.path, this.token);
  }

  /** Next event (undefined once the watch ended). */
  async next(): Promise<WatchEvent | undefined> {
    const r = await this.pull();
    return r.done ? undefined : r.value;
  }

  private pull(): Promise<IteratorResult<WatchEvent>> {
    const ev = this.buffered.shift();
    if (ev) return Promise.resolve({ value: ev, done: false });
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  [Symbol.asyncIterator](): AsyncIterator<WatchEvent> {
    return { next: () => this.pull(), return: async () => (await this.close(), { value: undefined, done: true }) };
  }
}

/** Where the daemon puts domain <domid>'s socket inside --domain-socket-dir (dom<N>.sock). */
export function domainSocketPath(domainSocketDir: string, domid: number): string {
  return `${domainSocketDir.replace(/\/+$/, '')}/dom${domid}.sock`;
}

export class XsClient {
  private readonly closeHandlers: Array<(err: Error) => void> = [];
  private readonly pending = new Map<number, Pending>();
  private readonly watches = new Map<string, XsWatch>();
  private readonly receiver: XsReceiver;
  private nextReq = 1;
  private lastReq = 0;
  private nextToken = 1;
  private corked = false;
  private closedErr: Error | undefined;
  /** Sees every xs_wire packet sent ('out') and received ('in'), header included (captures, docs/observability.md). */
  tap: ((dir: 'out' | 'in', packet: Buffer) => void) | null = null;

  private constructor(private readonly socket: net.Socket) {
    this.receiver = new XsReceiver((m) => this.onMessage(m));
    socket.on('data', (chunk: Buffer) => {
      try {
        this.receiver.push(chunk);
      } catch (err) {
        socket.destroy(err instanceof Error ? err : new Error(String(err)));
      }
    });
    socket.on('error', (err) => this.shutdown(err));
    socket.on('close', () => this.shutdown(new Error('xenstore connection closed')));
  }

  /** Connect to a xenstored socket. */
  static connect(socketPath: string): Promise<XsClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        s.setNoDelay?.(true);
        resolve(new XsClient(s));
      });
    });
  }

  /** Call `cb` once when the connection goes away (closed by us, by the daemon, or on RELEASE). */
  onClose(cb: (err: Error) => void): void {
    if (this.closedErr) queueMicrotask(() => cb(this.closedErr!));
    else this.closeHandlers.push(cb);
  }

  /** Whether the connection is gone (every later request rejects). */
  get closed(): boolean {
    return this.closedErr !== undefined;
  }

  /** Close the connection; outstanding requests reject, watches end. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
      this.socket.end();
      this.socket.destroy();
    });
  }

  // ---- raw request --------------------------------------------------------------------------------

  /** Send one request and resolve with the reply payload (rejects with XsError on an error reply). */
  request(type: XsType, payload: Buffer, tx: TxId = 0): Promise<Buffer> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const reqId = this.nextReq;
    this.nextReq = (this.nextReq + 1) >>> 0 || 1;
    this.lastReq = reqId;
    return new Promise((resolve, reject) => {
      this.pending.set(reqId, { type, resolve, reject });
      // Requests issued in the same tick (a pipelined batch) leave in one write: one syscall, and
      // xenstored woken once for all of them.
      if (!this.corked) {
        this.corked = true;
        this.socket.cork();
        process.nextTick(() => this.flush());
      }
      if (tracing) trace(`xc > ${XsType[type]} ${reqId} ${payload.toString('latin1').replace(/\0/g, '|')}`);
      const packet = encodeMessage(type, reqId, tx, payload);
      this.tap?.('out', packet);
      this.socket.write(packet);
    });
  }

  /** The id of the request sent last (0 before any): what `answered` takes. */
  get lastRequestId(): number {
    return this.lastReq;
  }

  /**
   * Whether the reply to request `reqId` has arrived (also once the connection is gone). xenstored
   * sends one connection's replies and watch events in the order it makes them, so a watch event that
   * arrives while a READ is unanswered reports a change made before that READ was handled: the READ's
   * answer already shows it.
   */
  answered(reqId: number): boolean {
    return !this.pending.has(reqId);
  }

  /**
   * Send the requests batched so far now, not at the end of this tick: before synchronous work (a
   * hypercall, building a ring) that would otherwise hold them back while xenstored could be answering.
   */
  flush(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  /** Whether every request sent so far has been handed to the kernel (none held back in this process). */
  get sent(): boolean {
    return !this.corked && this.socket.writableLength === 0;
  }

  private onMessage(m: XsMessage): void {
    this.tap?.('in', encodeMessage(m.type, m.reqId, m.txId, m.payload));
    if (tracing) trace(`xc < ${XsType[m.type]} ${m.reqId} ${m.type === XsType.WATCH_EVENT || m.type === XsType.READ ? m.payload.toString('latin1').replace(/\0/g, '|') : ''}`);
    if (m.type === XsType.WATCH_EVENT) {
      const s = splitStrings(m.payload);
      if (!s || s.length < 2) return;
      const [path, token] = s as [string, string];
      this.watches.get(token)?.deliver({ path, token });
      return;
    }
    const p = this.pending.get(m.reqId);
    if (!p) return;
    this.pending.delete(m.reqId);
    if (m.type === XsType.ERROR) {
      const name = m.payload.toString('latin1').replace(/\0+$/, '');
      // Without a stack: it would only show this socket's data handler, never the caller, and
      // refusals such as ENOENT (tryRead) are routine on the handshake's path.
      const limit = Error.stackTraceLimit;
      Error.stackTraceLimit = 0;
      const err = new XsError(isXsErrno(name) ? name : 'EIO', `${XsType[p.type]}: ${name}`);
      Error.stackTraceLimit = limit;
      p.reject(err);
    } else p.resolve(m.payload);
  }

  private shutdown(err: Error): void {
    if (this.closedErr) return;
    this.closedErr = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const w of this.watches.values()) w.end();
    this.watches.clear();
    for (const cb of this.closeHandlers.splice(0)) cb(err);
  }

  // ---- node operations ----------------------------------------------------------------------------

  /** READ: the raw value. */
  read(path: string, tx: TxId = 0): Promise<Buffer> {
    return this.request(XsType.READ, encodeStrings(path), tx);
  }

  /** READ as a UTF-8 string. */
  async readString(path: string, tx: TxId = 0): Promise<string> {
    return (await this.read(path, tx)).toString('utf8');
  }

  /** READ as a string, or undefined when the node does not exist (ENOENT). */
  async tryRead(path: string, tx: TxId = 0): Promise<string | undefined> {
    try {
      return await this.readString(path, tx);
    } catch (err) {
      if (err instanceof XsError && err.code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /** Whether a node exists (READ without ENOENT). */
  async exists(path: string, tx: TxId = 0): Promise<boolean> {
    try {
      await this.read(path, tx);
      return true;
    } catch (err) {
      if (err instanceof XsError && err.code === 'ENOENT') return false;
      throw err;
    }
  }

  /** WRITE (creates missing parents). */
  async write(path: string, value: string | Buffer, tx: TxId = 0): Promise<void> {
    await this.request(XsType.WRITE, encodeWrite(path, value), tx);
  }

  /** MKDIR (no error if it exists). */
  async mkdir(path: string, tx: TxId = 0): Promise<void> {
    await this.request(XsType.MKDIR, encodeStrings(path), tx);
  }

  /** RM, recursively. */
  async rm(path: string, tx: TxId = 0): Promise<void> {
    await this.request(XsType.RM, encodeStrings(path), tx);
  }

  /** DIRECTORY: child names. */
  async directory(path: string, tx: TxId = 0): Promise<string[]> {
    return splitStrings(await this.request(XsType.DIRECTORY, encodeStrings(path), tx)) ?? [];
  }

  /** DIRECTORY_PART: node generation and the children from byte `offset`; done when the list is complete. */
  async directoryPart(path: string, offset: number, tx: TxId = 0): Promise<{ gen: string; children: string[]; done: boolean }> {
    const s = splitStrings(await this.request(XsType.DIRECTORY_PART, encodeStrings(path, String(offset)), tx)) ?? [];
    const gen = s[0] ?? '';
    const rest = s.slice(1);
    const done = rest.length > 0 && rest[rest.length - 1] === '';
    return { gen, children: done ? rest.slice(0, -1) : rest, done };
  }

  /** GET_PERMS. */
  async getPerms(path: string, tx: TxId = 0): Promise<Perm[]> {
    const s = splitStrings(await this.request(XsType.GET_PERMS, encodeStrings(path), tx)) ?? [];
    return s.map((p) => {
      const perm = parsePerm(p);
      if (!perm) throw new XsError('EIO', `bad permission "${p}" from xenstored`);
      return perm;
    });
  }

  /** SET_PERMS: first entry is the owner and the default for unlisted domains. */
  async setPerms(path: string, perms: readonly Perm[], tx: TxId = 0): Promise<void> {
    await this.request(XsType.SET_PERMS, encodeStrings(path, ...perms.map(formatPerm)), tx);
  }

  // ---- watches ------------------------------------------------------------------------------------

  /**
   * WATCH `path`; the daemon fires once right away with `path` itself. Events go to `onEvent` if
   * given, else they queue for `for await (const ev of watch)`.
   */
  async watch(path: string, onEvent?: (ev: WatchEvent) => void, token?: string): Promise<XsWatch> {
    const tok = token ?? `vtpm-${this.nextToken++}`;
    if (this.watches.has(tok)) throw new XsError('EEXIST', `token ${tok} already in use on this client`);
    const w = new XsWatch(this, path, tok, onEvent);
    // registered before sending: the first event follows the OK immediately
    this.watches.set(tok, w);
    try {
      await this.request(XsType.WATCH, encodeStrings(path, tok));
    } catch (err) {
      this.watches.delete(tok);
      throw err;
    }
    return w;
  }

  /** UNWATCH (XsWatch.close() calls this). */
  async unwatch(path: string, token: string): Promise<void> {
    this.watches.get(token)?.end();
    this.watches.delete(token);
    await this.request(XsType.UNWATCH, encodeStrings(path, token));
  }

  /** RESET_WATCHES: drop all watches and transactions of this connection. */
  async resetWatches(): Promise<void> {
    await this.request(XsType.RESET_WATCHES, encodeStrings(''));
    for (const w of this.watches.values()) w.end();
    this.watches.clear();
  }

  // ---- transactions -------------------------------------------------------------------------------

  /** TRANSACTION_START: a new transaction id. */
  async transactionStart(): Promise<TxId> {
    const s = splitStrings(await this.request(XsType.TRANSACTION_START, encodeStrings('')));
    const id = Number(s?.[0]);
    if (!Number.isInteger(id) || id <= 0) throw new XsError('EIO', 'bad transaction id from xenstored');
    return id;
  }

  /** TRANSACTION_END: commit (rejects with XsError EAGAIN on conflict) or abort. */
  async transactionEnd(tx: TxId, commit: boolean): Promise<void> {
    await this.request(XsType.TRANSACTION_END, encodeStrings(commit ? 'T' : 'F'), tx);
  }

  /** Run fn in a transaction and commit; on EAGAIN run it again (up to maxAttempts). fn throwing aborts. */
  async transaction<T>(fn: (tx: TxId) => Promise<T>, maxAttempts = 100): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      const tx = await this.transactionStart();
      let result: T;
      try {
        result = await fn(tx);
      } catch (err) {
        await this.transactionEnd(tx, false).catch(() => {});
        throw err;
      }
      try {
        await this.transactionEnd(tx, true);
        return result;
      } catch (err) {
        if (!(err instanceof XsError && err.code === 'EAGAIN') || attempt >= maxAttempts) throw err;
        // under heavy contention a short random pause lets one of the contenders through
        if (attempt >= 3) await new Promise((r) => setTimeout(r, Math.random() * Math.min(attempt, 20)));
      }
    }
  }

  // ---- domains ------------------------------------------------------------------------------------

  /** INTRODUCE (dom0 only): the daemon opens <dir>/dom<domid>.sock for the domain. */
  async introduce(domid: number, gfn = 0, evtchn = 0): Promise<void> {
    await this.request(XsType.INTRODUCE, encodeStrings(String(domid), String(gfn), String(evtchn)));
  }

  /** RELEASE (dom0 only): closes the domain's socket and connections. */
  async release(domid: number): Promise<void> {
    await this.request(XsType.RELEASE, encodeStrings(String(domid)));
  }

  /** GET_DOMAIN_PATH: "/local/domain/<domid>". */
  async getDomainPath(domid: number): Promise<string> {
    return (splitStrings(await this.request(XsType.GET_DOMAIN_PATH, encodeStrings(String(domid)))) ?? [''])[0]!;
  }

  /** IS_DOMAIN_INTRODUCED. */
  async isDomainIntroduced(domid: number): Promise<boolean> {
    const s = splitStrings(await this.request(XsType.IS_DOMAIN_INTRODUCED, encodeStrings(String(domid))));
    return s?.[0] === 'T';
  }
}

/** Connect to a xenstored socket (same as XsClient.connect). */
export function connect(socketPath: string): Promise<XsClient> {
  return XsClient.connect(socketPath);
}
