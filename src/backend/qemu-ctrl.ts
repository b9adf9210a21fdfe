// One control client of a QEMU endpoint (qemu-endpoint.ts): requests read with recvmsg on the main
// loop (native/unix-rights.ts, which keeps passed descriptors), cut out by the control receiver
// (src/swtpm/), run through the endpoint one at a time and answered in order on Node's socket.
import type net from 'node:net';
import { closeFd, type Received, type RightsSocket } from '../../native/unix-rights.js';
import { MAX_STATE_BLOB, Res, resultOnly } from '../swtpm/codes.js';
import { CtrlReceiver, type CtrlRequest, type ReceiverEvent } from '../swtpm/ctrl-receiver.js';
import type { PollWindow } from '../xen/index.js';
import { awaitNextOnSocket } from './qemu-data.js';

/**
 * A control client may have this many requests unanswered, or this many reply bytes unread, before it
 * is cut off: QEMU sends one command and waits for its answer, and the reader does not pause.
 */
export const CTRL_MAX_UNANSWERED = 64;
export const CTRL_MAX_BACKLOG = MAX_STATE_BLOB + 64 * 1024;
/** Answered (non-fatal) protocol errors logged per control client. */
const CTRL_ERRORS_LOGGED = 3;

/** What runs a client's requests: the endpoint, one request at a time across all its clients. */
export interface CtrlTarget {
  run(req: CtrlRequest): Promise<Buffer>;
}

/** One control client: recvmsg on the main loop in (unix-rights.ts), Node's socket out. */
export class CtrlConnection {
  onClose: () => void = () => {};
  readonly #ep: CtrlTarget;
  readonly #sock: net.Socket;
  readonly #fd: number;
  /** Whether spinning for the client's next request after a reply pays (src/xen/poll.ts). */
  readonly #poll: PollWindow;
  readonly #rs: RightsSocket;
  readonly #rx = new CtrlReceiver((events) => this.#dispatch(events));
  readonly #log: (l: string) => void;
  #queue: Promise<void> = Promise.resolve();
  /** Requests received and not yet answered. */
  #unanswered = 0;
  /** Answered protocol errors logged so far: a client cannot flood the log with them. */
  #errorsLogged = 0;
  #closed = false;

  constructor(ep: CtrlTarget, sock: net.Socket, fd: number, rs: RightsSocket, log: (l: string) => void, poll: PollWindow) {
    this.#ep = ep;
    this.#poll = poll;
    this.#sock = sock;
    this.#fd = fd;
    this.#rs = rs;
    this.#log = log;
    sock.on('error', () => this.close());
    rs.on('data', (r: Received) => this.#onData(r));
    rs.on('end', () => this.close());
  }

  #onData(r: Received): void {
    if (this.#closed) {
      for (const fd of r.fds) closeFd(fd);
      return;
    }
    this.#poll.arrived();
    this.#dispatch(this.#rx.push(r.data, r.fds));
  }

  #dispatch(events: ReceiverEvent[]): void {
    for (const ev of events) {
      if (this.#closed) {
        for (const fd of ev.kind === 'error' ? ev.fds : ev.req.fds) closeFd(fd);
        continue;
      }
      if (++this.#unanswered > CTRL_MAX_UNANSWERED) {
        for (const fd of ev.kind === 'error' ? ev.fds : ev.req.fds) closeFd(fd);
        this.#cutOff(`${CTRL_MAX_UNANSWERED} requests unanswered and more arriving`);
        return;
      }
      // Replies go out in request order even when a later request is quick.
      this.#queue = this.#queue.then(async () => {
        this.#unanswered--;
        if (this.#closed) {
          for (const fd of ev.kind === 'error' ? ev.fds : ev.req.fds) closeFd(fd);
          return;
        }
        if (ev.kind === 'error') {
          for (const fd of ev.fds) closeFd(fd);
          const res = ev.err.result;
          if (ev.err.fatal || this.#errorsLogged < CTRL_ERRORS_LOGGED) {
            const more = !ev.err.fatal && ++this.#errorsLogged === CTRL_ERRORS_LOGGED ? ' (its further errors are not logged)' : '';
            this.#log(`control client: ${ev.err.message} -> ${res === null ? 'hang up' : `0x${res.toString(16)}`}${more}`);
          }
          if (res !== null) this.#write(resultOnly(res));
          if (ev.err.fatal) this.close(true);
          return;
        }
        const res = await this.#ep.run(ev.req).catch((err: unknown) => {
          this.#log(`control command 0x${ev.req.cmd.toString(16)}: ${(err as Error).message}`);
          return resultOnly(Res.FAIL);
        });
        this.#write(res);
        this.#awaitNext();
      });
    }
  }

  #write(b: Buffer): void {
    if (this.#closed || this.#sock.destroyed) return;
    if (this.#sock.writableLength + b.length > CTRL_MAX_BACKLOG) {
      this.#cutOff(`${this.#sock.writableLength} reply bytes unread`);
      return;
    }
    this.#sock.write(b);
  }

  /**
   * The last queued reply is out: stay on the CPU for the client's next request for a short window
   * (docs/qemu.md, "Where the time goes"); the event loop then finds it ready without sleeping.
   */
  #awaitNext(): void {
    if (this.#unanswered > 0 || this.#closed) return;
    awaitNextOnSocket(this.#poll, this.#fd, () => this.#unanswered === 0 && !this.#closed && this.#sock.writableLength === 0);
  }

  /** A client that does not read its replies: one log line, then it alone is hung up on. */
  #cutOff(what: string): void {
    this.#log(`control client cut off: ${what}`);
    this.close();
  }

  close(afterWrites = false): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const fd of this.#rx.destroy()) closeFd(fd);
    this.#rs.close();
    // Nothing reads this socket through Node, so it would never see the peer's end: destroy it once
    // the last reply is flushed.
    if (afterWrites) this.#sock.end(() => this.#sock.destroy());
    else this.#sock.destroy();
    this.onClose();
  }
}
