// The client's end of the manager's FIFO transport (fifo.ts has the manager's end and the layout):
// attaching a private pair through the rendezvous, and one exchange at a time on the console pair.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { mkfifo } from '../../native/fifo.js';
import { processAlive } from '../util/proc.js';
import { CLIENTS_DIR, CONSOLE_IN, CONSOLE_LOCK, CONSOLE_OUT, FrameReader, RENDEZVOUS, TransportError, openReader, openWriter, writeShared } from './fifo.js';
import { ANY_INSTANCE, REPLY_TAGS, Ord, Status, encodeConnect, encodeRequest, type Frame } from './wire.js';

const { O_RDONLY, O_WRONLY, O_NONBLOCK } = fs.constants;


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
  const reader = new FrameReader(openReader(rsp), REPLY_TAGS, false);
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

/** A pair attached on behalf of another process, whose two ends are handed to it as descriptors. */
export interface HandedPair {
  readonly files: readonly string[];
  /** The request FIFO's write end and the response FIFO's read end, in that order. */
  readonly fds: [req: number, rsp: number];
  /** Close our copies once the other process holds its own (idempotent). */
  release(): void;
  /** The hand-over failed: close our copies and remove the pair's FIFOs. */
  discard(): void;
}

/**
 * Attach a pair bound to `bind` for a process that cannot open the manager's FIFOs itself (a vTPM
 * domain under its own uid): the manager serves it as any attached client, confined to that instance.
 */
export async function handPair(runDir: string, opts: { name: string; bind: number }): Promise<HandedPair> {
  const pair = await connectPair(runDir, opts);
  let open = true;
  const release = (): void => {
    if (!open) return;
    open = false;
    for (const fd of fds) fs.closeSync(fd);
    pair.reader.close();
    pair.writer.destroy();
  };
  const discard = (): void => {
    release();
    for (const f of pair.files) fs.rmSync(f, { force: true });
  };
  let fds: number[] = [];
  try {
    fds = pairDescriptors(pair);
  } catch (err) {
    discard();
    throw err;
  }
  return { files: pair.files, fds: [fds[0]!, fds[1]!], release, discard };
}

/** The pair whose ends this process inherited as descriptors (see pairDescriptors). */
export function inheritedPair(name: string, reqFd: number, rspFd: number): ClientPair {
  return {
    name,
    reader: new FrameReader(new net.Socket({ fd: rspFd, readable: true, writable: false }), REPLY_TAGS, false),
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
  const reader = new FrameReader(new net.Socket({ fd, readable: true, writable: false }), REPLY_TAGS, false);
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
