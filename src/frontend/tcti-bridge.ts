// The TCTI bridge: lets tpm2-tools reach a guest's vTPM with `-T swtpm:host=127.0.0.1,port=P`.
// Data port P speaks raw TPM commands (src/swtpm/command-reassembler.ts); control port P+1 speaks
// the part of swtpm's control channel that the tpm2-tss swtpm TCTI uses (tcti-control.ts). Commands
// from every connection go through one queue because a TPM runs one command at a time; the locality
// is one value for the whole bridge, as in swtpm (the TCTI sets it on one connection and sends the
// command on another).

import { EventEmitter } from 'node:events';
import net from 'node:net';
import { ControlError, ControlReceiver, type ControlTarget } from './tcti-control.js';
import { checkMaxCommandSize, CommandReceiver, DataError, DEFAULT_MAX_COMMAND_SIZE } from '../swtpm/command-reassembler.js';
import { errorResponse, failureResponse, familyOfTag, sizeErrorCode } from '../tpm/error-response.js';

export { ControlError } from './tcti-control.js';
export { DataError, DEFAULT_MAX_COMMAND_SIZE } from '../swtpm/command-reassembler.js';

/** Replies a client has not read yet before we stop reading its requests. */
const WRITE_BACKLOG_MAX = 64 * 1024;

export interface TransmitOptions {
  /** Locality last set on the control port (0 until a client sets one). */
  locality: number;
}

export interface TctiBridgeOptions {
  /** Address both ports bind to; 127.0.0.1 unless you mean to expose the vTPM. */
  host?: string;
  /** Data port; control is port + 1. 0 picks a free consecutive pair. */
  port: number;
  /** Runs one TPM command on the vTPM and resolves to its response. Never called concurrently. */
  transmit: (cmd: Uint8Array, opts: TransmitOptions) => Promise<Uint8Array>;
  /** CMD_CANCEL_TPM_CMD; without it the command is answered TPM_BAD_ORDINAL and not advertised. */
  cancel?: () => void | Promise<void>;
  /** CMD_INIT (Tss2_Tcti_Swtpm_Reset sends flags 1); queued behind running TPM commands. */
  init?: (flags: number) => void | Promise<void>;
  /** Largest command accepted on the data port (default 4096, the tpmif v2 limit). */
  maxCommandSize?: number;
  /** swtpm's `--locality reject-locality-4`. */
  rejectLocality4?: boolean;
  /** Who may use the ports (e.g. only the guest's own uid and root); a refused connection is closed at once. */
  allowPeer?: (socket: net.Socket) => boolean;
}

export type TctiClientError = ControlError | DataError;

export interface TctiBridgeEvents {
  /** A client broke the protocol or its command failed; only that client's connection is affected. */
  clientError: [err: TctiClientError];
}

export class TctiBridge extends EventEmitter<TctiBridgeEvents> {
  readonly host: string;
  readonly maxCommandSize: number;
  #port = 0;
  #locality = 0;
  #queue: Promise<unknown> = Promise.resolve();
  #dataServer: net.Server | undefined;
  #ctrlServer: net.Server | undefined;
  readonly #sockets = new Set<net.Socket>();
  readonly #opts: TctiBridgeOptions;
  #stopped = false;

  private constructor(opts: TctiBridgeOptions) {
    super();
    this.#opts = opts;
    this.host = opts.host ?? '127.0.0.1';
    this.maxCommandSize = opts.maxCommandSize ?? DEFAULT_MAX_COMMAND_SIZE;
    checkMaxCommandSize(this.maxCommandSize); // before anything listens
  }

  /** Listens on port (data) and port + 1 (control); resolves once both accept connections. */
  static async start(opts: TctiBridgeOptions): Promise<TctiBridge> {
    const b = new TctiBridge(opts);
    await b.#listen(opts.port);
    return b;
  }

  /** Data port; the control port is one above. */
  get port(): number {
    return this.#port;
  }
  get ctrlPort(): number {
    return this.#port + 1;
  }
  /** The locality the next command will be sent with. */
  get locality(): number {
    return this.#locality;
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    const closing = [this.#dataServer, this.#ctrlServer].map(
      (s) => new Promise<void>((resolve) => (s && s.listening ? s.close(() => resolve()) : resolve())),
    );
    for (const s of this.#sockets) s.destroy();
    this.#sockets.clear();
    await Promise.all(closing);
  }

  async #listen(port: number): Promise<void> {
    if (!Number.isInteger(port) || port < 0 || port > 65534) {
      throw new RangeError(`port must be 0..65534 (control is port + 1), got ${port}`);
    }
    // Port 0: the kernel picks the data port; the control port must be the next one, so retry
    // until that one is free too.
    for (let attempt = 0; ; attempt++) {
      const data = this.#server((s) => this.#serveData(s));
      const dataPort = await listenOn(data, this.host, port);
      if (dataPort > 65534) {
        await closeServer(data);
        if (attempt < 50) continue;
        throw new Error('no free consecutive port pair for the TCTI bridge');
      }
      const ctrl = this.#server((s) => this.#serveControl(s));
      try {
        await listenOn(ctrl, this.host, dataPort + 1);
      } catch (e) {
        await closeServer(data);
        if (port === 0 && (e as NodeJS.ErrnoException).code === 'EADDRINUSE' && attempt < 50) continue;
        throw e;
      }
      this.#dataServer = data;
      this.#ctrlServer = ctrl;
      this.#port = dataPort;
      return;
    }
  }

  #server(serve: (s: net.Socket) => void): net.Server {
    // allowHalfOpen: a client may shut down its sending side and still wait for the response.
    const srv = net.createServer({ allowHalfOpen: true, noDelay: true }, (s) => {
      if (this.#stopped) return void s.destroy();
      if (this.#opts.allowPeer && !this.#opts.allowPeer(s)) return void s.destroy();
      this.#sockets.add(s);
      s.on('close', () => this.#sockets.delete(s));
      s.on('error', () => s.destroy()); // resets and the like end only that connection
      serve(s);
    });
    return srv;
  }

  /** Runs fn when every command queued before it has finished. */
  #enqueue<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.#queue.then(fn);
    this.#queue = p.catch(() => undefined);
    return p;
  }

  #serveData(s: net.Socket): void {
    const peer = `${s.remoteAddress}:${s.remotePort} on data port ${this.#port}`;
    const rx = new CommandReceiver(this.maxCommandSize);
    let busy = false;
    let ended = false;

    const pump = (): void => {
      while (!busy && !s.destroyed) {
        const f = rx.next();
        if (f === null) break;
        if (f.kind === 'too-large') {
          this.#report(new DataError('CMD_TOO_LARGE', peer, `commandSize ${f.size} exceeds ${this.maxCommandSize}`));
          s.write(sizeError(f.tag));
          continue;
        }
        if (f.kind === 'too-small') {
          this.#report(new DataError('CMD_TOO_SMALL', peer, `commandSize ${f.size} is below the 10-byte header`));
          closeAfterReplies(s, sizeError(f.tag));
          return;
        }
        busy = true;
        s.pause(); // one command in flight per connection keeps what we buffer bounded
        void this.#enqueue(() => this.#opts.transmit(f.bytes, { locality: this.#locality })).then(
          (rsp) => done(rsp),
          (e: unknown) => {
            this.#report(new DataError('TRANSMIT_FAILED', peer, `transmit failed: ${(e as Error)?.message ?? e}`));
            done(failureResponse(f.bytes));
          },
        );
      }
      if (busy || s.destroyed) return;
      if (ended) finish();
      else if (s.writableLength > WRITE_BACKLOG_MAX) s.once('drain', pump); // client not reading
      else if (s.isPaused()) s.resume();
    };

    const done = (rsp: Uint8Array): void => {
      busy = false;
      if (s.destroyed) return;
      s.write(rsp);
      pump();
    };

    const finish = (): void => {
      if (rx.partial > 0 && !rx.dead) {
        this.#report(new DataError('CMD_TRUNCATED', peer, `connection ended inside a command (${rx.partial} bytes pending)`));
      }
      s.end();
    };

    s.on('data', (chunk: Buffer) => {
      if (rx.dead) return;
      rx.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
      pump();
    });
    s.on('end', () => {
      ended = true;
      pump();
    });
  }

  #serveControl(s: net.Socket): void {
    const peer = `${s.remoteAddress}:${s.remotePort} on control port ${this.ctrlPort}`;
    const { cancel, init } = this.#opts;
    const target: ControlTarget = {
      setLocality: (loc) => {
        this.#locality = loc;
      },
      rejectLocality4: this.#opts.rejectLocality4 ?? false,
      onProtocolError: (err) => this.#report(err),
    };
    if (cancel) target.cancel = async () => void (await cancel());
    if (init) target.init = (flags) => this.#enqueue(async () => void (await init(flags)));

    const flow = (): void => {
      if (s.destroyed) return;
      if (rx.wantsPause) s.pause();
      else if (s.writableLength > WRITE_BACKLOG_MAX) {
        s.pause(); // client not reading its replies
        s.once('drain', flow);
      } else if (s.isPaused()) s.resume();
    };
    const rx = new ControlReceiver(
      target,
      peer,
      (bytes) => {
        if (s.destroyed) return;
        s.write(bytes);
        queueMicrotask(flow); // after the receiver has moved on to its next message
      },
      () => closeAfterReplies(s),
    );
    s.on('data', (chunk: Buffer) => {
      rx.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
      flow();
    });
    s.on('end', () => rx.end());
    s.on('close', () => rx.destroy());
  }

  #report(err: TctiClientError): void {
    this.emit('clientError', err);
  }
}

/** The size error of the family a command's tag names. */
function sizeError(tag: number): Uint8Array {
  const fam = familyOfTag(tag);
  return errorResponse(fam, sizeErrorCode(fam));
}

/** Time a peer gets to close after we finished our side, before the socket is destroyed. */
const CLOSE_LINGER_MS = 1000;

/** Ends our side once queued replies are out; a peer that keeps its side open is cut off later. */
function closeAfterReplies(s: net.Socket, last?: Uint8Array): void {
  if (s.destroyed) return;
  s.pause(); // nothing more is read from this peer
  if (last) s.end(last);
  else s.end();
  const t = setTimeout(() => s.destroy(), CLOSE_LINGER_MS);
  t.unref();
  s.once('close', () => clearTimeout(t));
}

function listenOn(srv: net.Server, host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => reject(e);
    srv.once('error', onError);
    srv.listen({ host, port, exclusive: true }, () => {
      srv.off('error', onError);
      srv.on('error', () => undefined); // accept errors (EMFILE) must not take the process down
      resolve((srv.address() as net.AddressInfo).port);
    });
  });
}

function closeServer(srv: net.Server): Promise<void> {
  return new Promise((resolve) => (srv.listening ? srv.close(() => resolve()) : resolve()));
}
