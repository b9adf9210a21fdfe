// The manager's FIFO transport, as in Xen 3.x's vtpm_managerd (docs/manager.md), plus a
// rendezvous so that any number of clients get their own pair:
//
//   run dir/from_console.fifo   console → manager  (privileged ordinals; many writers, frames ≤ PIPE_BUF)
//   run dir/to_console.fifo     manager → console  (held open O_RDWR by the manager so replies wait for a reader)
//   run dir/rendezvous.fifo     client → manager   (CONNECT frames ≤ PIPE_BUF, so many writers are safe)
//   run dir/clients/NAME.req.fifo  client → manager, one writer: frames of any size (256 KiB blobs)
//   run dir/clients/NAME.rsp.fifo  manager → client, one writer
//
// A CONNECT written to from_console.fifo instead of the rendezvous attaches a *privileged* pair: whoever
// may write the console may send privileged ordinals on it too, with frames of any size (a MIGRATE_IN
// blob is far larger than PIPE_BUF, which the shared console FIFO cannot carry).
//
// A FIFO write is atomic only up to PIPE_BUF, so a FIFO shared by several writers only ever carries
// frames that fit; big blobs travel on a FIFO with exactly one writer, where interleaving cannot happen.
// Every FIFO is opened O_NONBLOCK and wrapped in a libuv pipe handle (net.Socket({fd})), so reads and
// writes run on the event loop through epoll, never on the libuv threadpool (fs streams would).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { EventEmitter } from 'node:events';
import { mkfifo } from '../../native/fifo.js';
import {
  decodeConnect,
  encodeResponse,
  FrameDecoder,
  Ord,
  MAX_PARAMS,
  PIPE_BUF,
  SRV_HEADER_SIZE,
  Status,
  TAG_REQ,
  TPM_TAGS,
  WireError,
  splitSharedRead,
  type Frame,
} from './wire.js';

export const CONSOLE_IN = 'from_console.fifo';
export const CONSOLE_OUT = 'to_console.fifo';
export const RENDEZVOUS = 'rendezvous.fifo';
export const CLIENTS_DIR = 'clients';
export const CONSOLE_LOCK = 'console.lock';
/** Console replies queued beyond what to_console.fifo's pipe holds, before further ones are dropped. */
export const CONSOLE_QUEUE_BYTES = 1024 * 1024;

const { O_RDONLY, O_WRONLY, O_RDWR, O_NONBLOCK } = fs.constants;

export class TransportError extends Error {
  constructor(
    readonly code: 'NO_MANAGER' | 'NOT_A_FIFO' | 'TIMEOUT' | 'CLOSED' | 'PIPE_FULL' | 'TOO_LARGE',
    message: string,
  ) {
    super(message);
    this.name = 'TransportError';
  }
}

/** Creates the FIFO if missing; refuses a non-FIFO squatting on the name. */
export function ensureFifo(p: string, mode = 0o600): void {
  try {
    mkfifo(p, mode);
  } catch (err) {
    if ((err as { code?: string }).code !== 'EEXIST') throw err;
    if (!fs.lstatSync(p).isFIFO()) throw new TransportError('NOT_A_FIFO', `${p} exists and is not a FIFO`);
  }
}

/** A read end on the event loop. Opening O_NONBLOCK never waits for a writer. */
export function openReader(p: string): net.Socket {
  const fd = fs.openSync(p, O_RDONLY | O_NONBLOCK);
  return new net.Socket({ fd, readable: true, writable: false });
}

/** A write end on the event loop; throws ENXIO when nobody has the FIFO open for reading. */
export function openWriter(p: string): net.Socket {
  const fd = fs.openSync(p, O_WRONLY | O_NONBLOCK);
  return new net.Socket({ fd, readable: false, writable: true });
}

/** Whether a socket is a libuv pipe handle (event-loop I/O), which is what the tests verify. */
export function isEventLoopPipe(s: net.Socket): boolean {
  const h = (s as unknown as { _handle?: { constructor?: { name?: string } } })._handle;
  return h?.constructor?.name === 'Pipe';
}

/**
 * One frame onto a FIFO that several processes write: one write(2) of at most PIPE_BUF bytes, which
 * the kernel never interleaves with another writer's. Synchronous on purpose: O_NONBLOCK makes it
 * either complete at once or fail with EAGAIN (pipe full), never block the loop.
 */
export function writeShared(p: string, frame: Uint8Array): void {
  if (frame.length > PIPE_BUF) throw new TransportError('TOO_LARGE', `${frame.length}-byte frame on shared FIFO ${p} exceeds PIPE_BUF`);
  let fd: number;
  try {
    fd = fs.openSync(p, O_WRONLY | O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENXIO' || code === 'ENOENT') throw new TransportError('NO_MANAGER', `no manager is reading ${p} (${code})`);
    throw err;
  }
  try {
    const n = fs.writeSync(fd, frame);
    if (n !== frame.length) throw new TransportError('PIPE_FULL', `short write of ${n}/${frame.length} bytes to ${p}`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EAGAIN') throw new TransportError('PIPE_FULL', `${p} is full`);
    throw err;
  } finally {
    fs.closeSync(fd);
  }
}

/** Largest parameter block on a FIFO with several writers: the whole frame must fit one atomic write. */
export const SHARED_MAX_PARAMS = PIPE_BUF - SRV_HEADER_SIZE;

/**
 * Frames from one read end. `shared`: the FIFO has several writers, each of whose frames is one write of
 * at most PIPE_BUF bytes; every read is split on its own (wire.ts splitSharedRead), so a half frame or
 * garbage costs one error for its own bytes and never swallows a later writer's frame. On a one-writer
 * FIFO frames may span reads (any size) and a framing error is final.
 */
export class FrameReader extends EventEmitter<{
  frame: [Frame];
  error: [WireError];
  end: [];
}> {
  #decoder: FrameDecoder;
  constructor(
    readonly socket: net.Socket,
    private readonly accept: readonly number[],
    private readonly shared: boolean,
  ) {
    super();
    this.#decoder = new FrameDecoder(accept);
    socket.on('data', (chunk: Buffer) => (shared ? this.#onSharedData(chunk) : this.#onData(chunk)));
    socket.on('end', () => {
      // The writer left in the middle of a frame (its size promised more than it sent): say so.
      if (!this.#decoder.idle && !this.#decoder.failed)
        this.emit('error', new WireError('TRUNCATED', `writer closed the FIFO in the middle of a frame (${this.#decoder.describePartial()})`));
      this.emit('end');
    });
    socket.on('error', () => this.emit('end'));
  }

  #onSharedData(chunk: Buffer): void {
    const { frames, error } = splitSharedRead(chunk, this.accept, SHARED_MAX_PARAMS);
    if (error) this.emit('error', error);
    for (const f of frames) this.emit('frame', f);
  }

  #onData(chunk: Buffer): void {
    if (this.#decoder.failed) return;
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      this.emit('error', err);
      return;
    }
    for (const f of frames) this.emit('frame', f);
  }

  close(): void {
    this.socket.destroy();
  }
}

// ---- manager side ----------------------------------------------------------------------------

export interface ClientInfo {
  /** The client's chosen name (its FIFO pair is clients/NAME.{req,rsp}.fifo). */
  name: string;
  pid: number;
  /** The only instance this client may address, or ANY_INSTANCE (the single-VM backend). */
  bind: number;
  /** Attached through the console FIFO: privileged ordinals are accepted on this pair. */
  privileged: boolean;
}

/** How much a client may leave unread before it is cut off (see ClientChannel.send). */
export interface QueueLimits {
  /** Reply bytes queued in the manager beyond what the pipe holds; default two of the largest replies. */
  bytes: number;
  /** How long queued replies may sit without the client reading any; default 30 s. */
  stallMs: number;
}

export const DEFAULT_QUEUE_LIMITS: QueueLimits = { bytes: 2 * MAX_PARAMS + 2 * SRV_HEADER_SIZE, stallMs: 30_000 };

export class ClientChannel extends EventEmitter<{ frame: [Frame]; error: [WireError]; gone: [string] }> {
  #closed = false;
  #stall: NodeJS.Timeout | undefined;
  constructor(
    readonly info: ClientInfo,
    private readonly reader: FrameReader,
    private readonly writer: net.Socket,
    private readonly files: string[],
    private readonly limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
  ) {
    super();
    reader.on('frame', (f) => this.emit('frame', f));
    reader.on('error', (e) => this.emit('error', e));
    reader.on('end', () => this.close('client closed its request FIFO'));
    writer.on('error', (e) => this.close(`response FIFO: ${e.message}`));
    writer.on('drain', () => this.#disarm());
  }

  get label(): string {
    return `client ${this.info.name} (pid ${this.info.pid})`;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Queues a reply. A client that stops reading would make the manager hold its replies without end:
   * past `limits.bytes` queued, or `limits.stallMs` without the pipe draining, it is cut off (its pair
   * dropped, unsent replies discarded); no other client shares this queue.
   */
  send(frame: Uint8Array): void {
    if (this.#closed) return;
    // The replies of one tick leave in one write(2).
    const w = this.writer;
    if (!w.writableCorked) {
      w.cork();
      process.nextTick(() => w.uncork());
    }
    if (w.write(frame)) return;
    const queued = this.writer.writableLength;
    if (queued > this.limits.bytes) {
      this.cutOff(`stopped reading its replies: ${queued} bytes queued (limit ${this.limits.bytes})`);
      return;
    }
    this.#stall ??= setTimeout(() => this.cutOff(`stopped reading its replies: ${this.writer.writableLength} bytes unread for ${this.limits.stallMs} ms`), this.limits.stallMs);
  }

  #disarm(): void {
    clearTimeout(this.#stall);
    this.#stall = undefined;
  }

  /** Drops the pair at once, discarding replies it has not read. */
  cutOff(reason: string): void {
    if (this.#closed) return;
    this.writer.destroy();
    this.close(reason);
  }

  /** Flushes what was sent, then drops the pair (used after a fatal framing error). */
  close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#disarm();
    this.reader.close();
    this.writer.end();
    for (const f of this.files) fs.rmSync(f, { force: true });
    this.emit('gone', reason);
  }
}

export interface FifoServerEvents {
  console: [Frame];
  consoleError: [WireError];
  client: [ClientChannel];
  rendezvousError: [string];
}

/** The manager's end: console pair, rendezvous, and the client pairs it attaches. */
export class FifoServer extends EventEmitter<FifoServerEvents> {
  #console!: FrameReader;
  #consoleOut!: net.Socket;
  #rendezvous!: FrameReader;
  #keepalive: number[] = [];
  #clients = new Set<ClientChannel>();

  private constructor(
    readonly runDir: string,
    private readonly limits: QueueLimits,
  ) {
    super();
  }

  static listen(runDir: string, limits: Partial<QueueLimits> = {}): FifoServer {
    const s = new FifoServer(runDir, { ...DEFAULT_QUEUE_LIMITS, ...limits });
    fs.mkdirSync(path.join(runDir, CLIENTS_DIR), { recursive: true, mode: 0o700 });
    for (const f of [CONSOLE_IN, CONSOLE_OUT, RENDEZVOUS]) ensureFifo(path.join(runDir, f));
    s.#console = s.#sharedReader(CONSOLE_IN, [TAG_REQ, ...TPM_TAGS]);
    s.#console.on('frame', (f) => (f.tag === TAG_REQ && f.code === Ord.CONNECT ? s.#onConnect(f, true) : s.emit('console', f)));
    s.#console.on('error', (e) => s.emit('consoleError', e));
    // O_RDWR: never ENXIO, and a reply waits in the pipe until the hotplug script opens its read end.
    const outFd = fs.openSync(path.join(runDir, CONSOLE_OUT), O_RDWR | O_NONBLOCK);
    s.#consoleOut = new net.Socket({ fd: outFd, readable: false, writable: true });
    s.#consoleOut.on('error', () => {});
    s.#rendezvous = s.#sharedReader(RENDEZVOUS, [TAG_REQ]);
    s.#rendezvous.on('frame', (f) => s.#onConnect(f, false));
    s.#rendezvous.on('error', (e) => s.emit('rendezvousError', e.message));
    return s;
  }

  /** A many-writer FIFO: keep a write end ourselves so the last writer leaving is not EOF. */
  #sharedReader(name: string, accept: readonly number[]): FrameReader {
    const p = path.join(this.runDir, name);
    const r = new FrameReader(openReader(p), accept, true);
    this.#keepalive.push(fs.openSync(p, O_WRONLY | O_NONBLOCK));
    return r;
  }

  /**
   * Puts a reply into to_console.fifo, which the manager holds open itself. Unread replies pile up there
   * when console writers do not read them; past CONSOLE_QUEUE_BYTES beyond the pipe the reply is dropped
   * (false) rather than held without bound.
   */
  replyConsole(frame: Uint8Array): boolean {
    if (this.#consoleOut.writableLength > CONSOLE_QUEUE_BYTES) return false;
    this.#consoleOut.write(frame);
    return true;
  }

  get clients(): ReadonlySet<ClientChannel> {
    return this.#clients;
  }

  #onConnect(f: Frame, privileged: boolean): void {
    if (f.code !== Ord.CONNECT) {
      this.emit('rendezvousError', `ordinal 0x${f.code.toString(16)} on ${RENDEZVOUS} (only CONNECT is valid there)`);
      return;
    }
    let info: ClientInfo;
    try {
      info = { ...decodeConnect(f.params), privileged };
    } catch (err) {
      this.emit('rendezvousError', (err as Error).message);
      return;
    }
    const dir = path.join(this.runDir, CLIENTS_DIR);
    const reqPath = path.join(dir, `${info.name}.req.fifo`);
    const rspPath = path.join(dir, `${info.name}.rsp.fifo`);
    for (const c of this.#clients) {
      // A client re-sending CONNECT because our ack was slow: the pair is already attached.
      if (c.info.name === info.name) return;
    }
    let reader: FrameReader;
    let writer: net.Socket;
    try {
      for (const p of [reqPath, rspPath]) {
        const st = fs.lstatSync(p);
        if (!st.isFIFO()) throw new Error(`${p} is not a FIFO`);
        if (st.uid !== process.getuid!()) throw new Error(`${p} belongs to uid ${st.uid}`);
      }
      writer = openWriter(rspPath);
      reader = new FrameReader(openReader(reqPath), [TAG_REQ, ...TPM_TAGS], false);
    } catch (err) {
      this.emit('rendezvousError', `CONNECT from ${info.name} (pid ${info.pid}): ${(err as Error).message}`);
      return;
    }
    const ch = new ClientChannel(info, reader, writer, [reqPath, rspPath], this.limits);
    this.#clients.add(ch);
    ch.on('gone', () => this.#clients.delete(ch));
    ch.send(encodeResponse(info.bind, Status.SUCCESS));
    this.emit('client', ch);
  }

  close(): void {
    for (const c of [...this.#clients]) c.close('manager stopping');
    this.#console.close();
    this.#rendezvous.close();
    this.#consoleOut.destroy();
    for (const fd of this.#keepalive) fs.closeSync(fd);
    this.#keepalive = [];
  }
}
