// The manager's FIFO transport, as in Xen 3.x's vtpm_managerd (protocols/xen.md §6.3), plus a
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
import { processAlive } from '../xen/proc.js';
import {
  ANY_INSTANCE,
  decodeConnect,
  encodeConnect,
  encodeRequest,
  encodeResponse,
  FrameDecoder,
  Ord,
  PIPE_BUF,
  Status,
  TAG_REQ,
  TAG_RSP,
  TPM_TAGS,
  WireError,
  type Frame,
} from './wire.js';

export const CONSOLE_IN = 'from_console.fifo';
export const CONSOLE_OUT = 'to_console.fifo';
export const RENDEZVOUS = 'rendezvous.fifo';
export const CLIENTS_DIR = 'clients';
export const CONSOLE_LOCK = 'console.lock';

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

/** Frames from one read end. `resync`: the FIFO has many writers whose frames are whole writes, so after
 *  garbage the decoder may start again at the next read; on a one-writer FIFO a framing error is final. */
export class FrameReader extends EventEmitter<{
  frame: [Frame];
  error: [WireError];
  end: [];
}> {
  #decoder: FrameDecoder;
  constructor(
    readonly socket: net.Socket,
    private readonly accept: readonly number[],
    private readonly resync: boolean,
  ) {
    super();
    this.#decoder = new FrameDecoder(accept);
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('end', () => {
      // The writer left in the middle of a frame (its size promised more than it sent): say so.
      if (!this.#decoder.idle && !this.#decoder.failed)
        this.emit('error', new WireError('TRUNCATED', 'writer closed the FIFO in the middle of a frame'));
      this.emit('end');
    });
    socket.on('error', () => this.emit('end'));
  }

  #onData(chunk: Buffer): void {
    if (this.#decoder.failed) return;
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      this.emit('error', err);
      if (this.resync) this.#decoder = new FrameDecoder(this.accept);
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

export class ClientChannel extends EventEmitter<{ frame: [Frame]; error: [WireError]; gone: [string] }> {
  #closed = false;
  constructor(
    readonly info: ClientInfo,
    private readonly reader: FrameReader,
    private readonly writer: net.Socket,
    private readonly files: string[],
  ) {
    super();
    reader.on('frame', (f) => this.emit('frame', f));
    reader.on('error', (e) => this.emit('error', e));
    reader.on('end', () => this.close('client closed its request FIFO'));
    writer.on('error', (e) => this.close(`response FIFO: ${e.message}`));
  }

  get label(): string {
    return `client ${this.info.name} (pid ${this.info.pid})`;
  }

  get closed(): boolean {
    return this.#closed;
  }

  send(frame: Uint8Array): void {
    if (!this.#closed) this.writer.write(frame);
  }

  /** Flushes what was sent, then drops the pair (used after a fatal framing error). */
  close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
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

  private constructor(readonly runDir: string) {
    super();
  }

  static listen(runDir: string): FifoServer {
    const s = new FifoServer(runDir);
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

  replyConsole(frame: Uint8Array): void {
    this.#consoleOut.write(frame);
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
    const ch = new ClientChannel(info, reader, writer, [reqPath, rspPath]);
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

// ---- client side -----------------------------------------------------------------------------

export interface ClientPair {
  name: string;
  reader: FrameReader;
  writer: net.Socket;
  files: string[];
}

/**
 * Attaches a private FIFO pair: make both FIFOs, open our read end of the response FIFO, send
 * CONNECT on the rendezvous (re-sent each second: a CONNECT lost to a garbage writer must not hang
 * us), wait for the manager's ack on the response FIFO, then open our write end of the request FIFO.
 */
export async function connectPair(
  runDir: string,
  opts: { name: string; bind?: number; timeoutMs?: number; via?: 'rendezvous' | 'console' },
): Promise<ClientPair> {
  const dir = path.join(runDir, CLIENTS_DIR);
  const req = path.join(dir, `${opts.name}.req.fifo`);
  const rsp = path.join(dir, `${opts.name}.rsp.fifo`);
  const files = [req, rsp];
  mkfifo(req, 0o600);
  mkfifo(rsp, 0o600);
  const reader = new FrameReader(openReader(rsp), [TAG_RSP], false);
  const hello = encodeRequest(0, Ord.CONNECT, encodeConnect({ bind: opts.bind ?? ANY_INSTANCE, pid: process.pid, name: opts.name }));
  const cleanup = (): void => {
    reader.close();
    for (const f of files) fs.rmSync(f, { force: true });
  };
  try {
    await new Promise<void>((resolve, reject) => {
      const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
      let timer: NodeJS.Timeout | undefined;
      const finish = (err?: Error): void => {
        clearTimeout(timer);
        reader.off('frame', onFrame);
        reader.off('end', onEnd);
        if (err) reject(err);
        else resolve();
      };
      const onFrame = (f: Frame): void => {
        if (f.code === Status.SUCCESS) finish();
        else finish(new TransportError('CLOSED', `manager refused CONNECT with status ${f.code}`));
      };
      const onEnd = (): void => finish(new TransportError('CLOSED', 'manager closed the response FIFO'));
      const send = (): void => {
        if (Date.now() > deadline) return finish(new TransportError('TIMEOUT', `no CONNECT ack from the manager in ${runDir}`));
        try {
          writeShared(path.join(runDir, opts.via === 'console' ? CONSOLE_IN : RENDEZVOUS), hello);
        } catch (err) {
          if (!(err instanceof TransportError && err.code === 'PIPE_FULL')) return finish(err as Error);
        }
        timer = setTimeout(send, 1000);
      };
      reader.on('frame', onFrame);
      reader.on('end', onEnd);
      send();
    });
    const writer = openWriter(req);
    return { name: opts.name, reader, writer, files };
  } catch (err) {
    cleanup();
    throw err;
  }
}

/**
 * Fresh descriptors for an attached pair's request write end and response read end, for a child that
 * cannot open the FIFOs itself (a vTPM domain under its own uid); close yours once the child has them.
 */
export function pairDescriptors(pair: ClientPair): [req: number, rsp: number] {
  const [req, rsp] = pair.files as [string, string];
  return [fs.openSync(req, O_WRONLY | O_NONBLOCK), fs.openSync(rsp, O_RDONLY | O_NONBLOCK)];
}

/** The pair whose ends this process inherited as descriptors (see pairDescriptors). */
export function inheritedPair(name: string, reqFd: number, rspFd: number): ClientPair {
  return {
    name,
    reader: new FrameReader(new net.Socket({ fd: rspFd, readable: true, writable: false }), [TAG_RSP], false),
    writer: new net.Socket({ fd: reqFd, readable: false, writable: true }),
    files: [],
  };
}

/**
 * The console pair answers whoever reads first, so console users take turns: an exclusive lock file
 * holding the owner's pid (a dead owner's lock is broken), plus an in-process queue.
 */
let consoleQueue: Promise<unknown> = Promise.resolve();

export function withConsoleLock<T>(runDir: string, fn: () => Promise<T>): Promise<T> {
  const run = async (): Promise<T> => {
    const lock = path.join(runDir, CONSOLE_LOCK);
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        const fd = fs.openSync(lock, fs.constants.O_CREAT | fs.constants.O_EXCL | O_WRONLY, 0o600);
        fs.writeSync(fd, String(process.pid));
        fs.closeSync(fd);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        breakStaleLock(lock);
        if (Date.now() > deadline) throw new TransportError('TIMEOUT', `console lock ${lock} held too long`);
        await new Promise((r) => setTimeout(r, 5));
      }
    }
    try {
      return await fn();
    } finally {
      fs.rmSync(lock, { force: true });
    }
  };
  const p = consoleQueue.then(run, run);
  consoleQueue = p.catch(() => undefined);
  return p;
}

function breakStaleLock(lock: string): void {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(lock, 'utf8'));
  } catch {
    return;
  }
  if (!Number.isInteger(pid) || pid <= 0) return;
  if (!processAlive(pid)) fs.rmSync(lock, { force: true });
}

/** One privileged request on the console pair (caller holds the console lock). */
export async function consoleRequest(runDir: string, frame: Uint8Array, timeoutMs = 10_000): Promise<Frame> {
  const outPath = path.join(runDir, CONSOLE_OUT);
  const fd = fs.openSync(outPath, O_RDONLY | O_NONBLOCK);
  // Drop replies nobody collected (a console user that died before reading), so ours is the next one.
  const scratch = Buffer.allocUnsafe(65536);
  for (;;) {
    try {
      if (fs.readSync(fd, scratch) <= 0) break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') break;
      fs.closeSync(fd);
      throw err;
    }
  }
  const reader = new FrameReader(new net.Socket({ fd, readable: true, writable: false }), [TAG_RSP], false);
  try {
    return await new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => reject(new TransportError('TIMEOUT', `no reply on ${outPath}`)), timeoutMs);
      reader.once('frame', (f) => {
        clearTimeout(timer);
        resolve(f);
      });
      reader.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      try {
        writeShared(path.join(runDir, CONSOLE_IN), frame);
      } catch (err) {
        clearTimeout(timer);
        reject(err);
      }
    });
  } finally {
    reader.close();
  }
}
