// The swtpm-compatible endpoint of one VM's vTPM for QEMU's `-tpmdev emulator`: a UNIX control socket
// speaking swtpm's control protocol (docs/protocols/swtpm-ctrl.md; src/swtpm/) and the TPM data channel QEMU passes in with
// CMD_SET_DATAFD. The vTPM behind it is the VM's manager-backed instance, as for a ring guest.
//
// Like swtpm started for QEMU (`swtpm socket --ctrl type=unixio,...` without --flags not-need-init),
// the TPM is off until CMD_INIT; data commands before that get the TPM's fatal error, which is how
// QEMU's version probe recognises a TPM 2. Unlike swtpm, several control clients are served at once
// (swtpm #415: a second one must not hang the first); their commands run one at a time.
import net from 'node:net';
import fs from 'node:fs';
import { RightsReader, closeFd, type RightsSocket } from '../../native/unix-rights.js';
import { PollWindow } from '../xen/index.js';
import { CtrlConnection } from './qemu-ctrl.js';
import {
  Cap,
  Cmd,
  GETINFO_SIZE,
  INIT_FLAG_DELETE_VOLATILE,
  Res,
  STATE_FLAG_ENCRYPTED,
  resultOnly,
  u32s,
} from '../swtpm/codes.js';
import type { CtrlRequest } from '../swtpm/ctrl-receiver.js';
import { DataChannel } from './qemu-data.js';
import { StateBlobError } from '../tpm/state-blob.js';
import type { StateKind } from '../tpm/state-store.js';
import type { SwtpmVtpm } from '../tpm/vtpm.js';
import type { GuestObserver } from './observe.js';

export interface QemuEndpointOptions {
  path: string;
  vtpm: SwtpmVtpm;
  log: (line: string) => void;
  /** Called after CMD_SHUTDOWN was answered (swtpm exits there; we power off and keep listening). */
  onShutdown?: () => void;
  /** Metrics and capture of this VM's commands (docs/observability.md). */
  observer?: GuestObserver;
  /** The busy-wait window after each reply, per connection (default: VTPM_POLL_US, off under CPU pressure). */
  pollWindow?: () => PollWindow;
}

/** What we implement: everything QEMU 7.2 needs (0x348F + 0x0700 for migration) and swtpm_ioctl uses. */
export const OUR_CAPS =
  Cap.INIT |
  Cap.SHUTDOWN |
  Cap.GET_TPMESTABLISHED |
  Cap.SET_LOCALITY |
  Cap.CANCEL_TPM_CMD |
  Cap.STORE_VOLATILE |
  Cap.RESET_TPMESTABLISHED |
  Cap.GET_STATEBLOB |
  Cap.SET_STATEBLOB |
  Cap.STOP |
  Cap.GET_CONFIG |
  Cap.SET_DATAFD |
  Cap.SET_BUFFERSIZE |
  Cap.GET_INFO;

const KIND_OF_TYPE: Record<number, StateKind> = { 1: 'permanent', 2: 'volatile', 3: 'savestate' };

/** Limits on one control client (qemu-ctrl.ts). */
export { CTRL_MAX_BACKLOG, CTRL_MAX_UNANSWERED } from './qemu-ctrl.js';

export class QemuEndpoint {
  readonly path: string;
  readonly #o: QemuEndpointOptions;
  readonly #server: net.Server;
  readonly #conns = new Set<CtrlConnection>();
  #data: DataChannel | null = null;
  #locality = 0;
  /** Control commands of every client run one at a time against the vTPM. */
  #chain: Promise<void> = Promise.resolve();
  #closed = false;
  /** Why the vTPM is no longer ours to drive (fence()), or null. */
  #fenced: string | null = null;

  private constructor(o: QemuEndpointOptions, server: net.Server) {
    this.#o = o;
    this.path = o.path;
    this.#server = server;
  }

  /** Listen on `path` (replacing a stale socket file); resolves once it accepts connections. */
  static async listen(o: QemuEndpointOptions): Promise<QemuEndpoint> {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(o.path);
    } catch {
      /* nothing there */
    }
    if (st) {
      // Replace only a dead socket: a live one belongs to someone (a swtpm, another host).
      if (!st.isSocket()) throw new Error(`${o.path} exists and is not a socket`);
      if (await answers(o.path)) throw new Error(`${o.path} is in use by a live listener`);
      fs.unlinkSync(o.path);
    }
    // Paused on connect: libuv must never read a control socket (it would drop passed fds).
    const server = net.createServer({ pauseOnConnect: true });
    const ep = new QemuEndpoint(o, server);
    server.on('connection', (s) => ep.#accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.chmodSync(o.path, 0o600);
    return ep;
  }

  get vtpm(): SwtpmVtpm {
    return this.#o.vtpm;
  }

  get hasDataChannel(): boolean {
    return this.#data !== null;
  }

  #accept(sock: net.Socket): void {
    const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (this.#closed || fd === undefined || fd < 0) {
      sock.destroy();
      return;
    }
    let rs: RightsSocket;
    try {
      rs = RightsReader.shared().add(fd);
    } catch (err) {
      this.#o.log(`control connection refused: ${(err as Error).message}`);
      sock.destroy();
      return;
    }
    const conn = new CtrlConnection(this, sock, fd, rs, this.#o.log, this.#newPollWindow());
    this.#conns.add(conn);
    conn.onClose = () => this.#conns.delete(conn);
  }

  #newPollWindow(): PollWindow {
    return this.#o.pollWindow?.() ?? new PollWindow();
  }

  /** Queue one request's handling behind every other client's. */
  run(req: CtrlRequest): Promise<Buffer> {
    const p = this.#chain.then(() => this.#handle(req));
    this.#chain = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  async #handle(req: CtrlRequest): Promise<Buffer> {
    const v = this.#o.vtpm;
    const running = v.status === 'running';
    // Only SET_DATAFD takes descriptors; any others are closed right away.
    const fds = req.fds;
    if (req.cmd !== Cmd.SET_DATAFD || this.#fenced) for (const fd of fds.splice(0)) closeFd(fd);
    // Fenced: nothing reaches the vTPM any more; GET_STATEBLOB's errors keep its 16-byte shape.
    if (this.#fenced) return req.cmd === Cmd.GET_STATEBLOB ? u32s(Res.FAIL, 0, 0, 0) : resultOnly(Res.FAIL);
    const p = req.payload;
    switch (req.cmd) {
      case Cmd.GET_CAPABILITY:
        // swtpm 0.7.1 writes a BE u64 (QEMU 7.2 reads one): the same 8 bytes as {result 0, caps}.
        return u32s(Res.SUCCESS, OUR_CAPS);
      case Cmd.INIT: {
        const flags = p.readUInt32BE(0);
        try {
          if (v.status === 'failed') await v.recreate();
          else {
            if (running) await v.powerOff();
            await v.powerOn();
          }
          this.#o.observer?.capture?.newStream();
          this.#o.log(`vTPM ${v.instance}: CMD_INIT flags 0x${flags.toString(16)}${flags & INIT_FLAG_DELETE_VOLATILE ? ' (delete volatile)' : ''}`);
          return resultOnly(Res.SUCCESS);
        } catch (err) {
          this.#o.log(`vTPM ${v.instance}: CMD_INIT failed: ${(err as Error).message}`);
          return resultOnly(Res.FAIL);
        }
      }
      case Cmd.SHUTDOWN:
      case Cmd.STOP:
        await v.powerOff().catch((err: unknown) => this.#o.log(`vTPM ${v.instance}: power off: ${(err as Error).message}`));
        if (req.cmd === Cmd.SHUTDOWN) {
          // swtpm's process ends here, taking the data channel with it; ours stays for the next QEMU.
          this.#data?.close();
          this.#data = null;
          setImmediate(() => this.#o.onShutdown?.());
        }
        return resultOnly(Res.SUCCESS);
      case Cmd.SET_LOCALITY: {
        const loc = p[0]!;
        if (loc > 4) return resultOnly(Res.BAD_LOCALITY);
        this.#locality = loc; // kept across INIT, as swtpm does
        return resultOnly(Res.SUCCESS);
      }
      case Cmd.GET_CONFIG:
        return u32s(Res.SUCCESS, 0); // no file key, no migration key: blobs travel unencrypted
      case Cmd.SET_DATAFD:
        return this.#setDataFd(fds);
      case Cmd.SET_BUFFERSIZE: {
        const wanted = p.readUInt32BE(0);
        if (wanted !== 0 && running) return resultOnly(Res.BAD_ORDINAL);
        const r = v.setBufferSize(wanted);
        return u32s(Res.SUCCESS, r.size, r.min, r.max);
      }
      case Cmd.GET_INFO:
        return this.#getInfo(p);
      case Cmd.SET_STATEBLOB:
        return this.#setStateBlob(p, req.blob!, running);
      default:
        break;
    }
    // Everything below needs a running TPM.
    if (!running) return resultOnly(Res.BAD_ORDINAL);
    switch (req.cmd) {
      case Cmd.GET_TPMESTABLISHED:
        // The flag is set only by an H-CRTM hash sequence at locality 4, which we do not offer.
        return Buffer.concat([u32s(Res.SUCCESS), Buffer.from([0, 0, 0, 0])]);
      case Cmd.RESET_TPMESTABLISHED:
        return resultOnly(p[0]! > 4 ? Res.BAD_LOCALITY : Res.SUCCESS);
      case Cmd.CANCEL_TPM_CMD:
        v.cancel();
        return resultOnly(Res.SUCCESS);
      case Cmd.STORE_VOLATILE:
        try {
          await v.saveVolatile();
          return resultOnly(Res.SUCCESS);
        } catch {
          return resultOnly(Res.FAIL);
        }
      case Cmd.GET_STATEBLOB:
        return this.#getStateBlob(p);
      default:
        return resultOnly(Res.BAD_ORDINAL);
    }
  }

  #setDataFd(fds: number[]): Buffer {
    if (fds.length !== 1) {
      for (const fd of fds) closeFd(fd);
      return resultOnly(Res.BAD_PARAMETER);
    }
    if (this.#data) {
      closeFd(fds[0]!);
      return resultOnly(Res.IOERROR);
    }
    let ch: DataChannel;
    try {
      ch = new DataChannel(fds[0]!, this, this.#o.log, this.#newPollWindow());
    } catch (err) {
      closeFd(fds[0]!);
      this.#o.log(`SET_DATAFD: ${(err as Error).message}`);
      return resultOnly(Res.BAD_PARAMETER);
    }
    this.#data = ch;
    ch.onClose = () => {
      if (this.#data === ch) this.#data = null; // swtpm forgets the fd on POLLHUP
    };
    return resultOnly(Res.SUCCESS);
  }

  #getInfo(p: Buffer): Buffer {
    const flags = Number(p.readBigUInt64BE(0) & 0xffffffffn);
    const offset = p.readUInt32BE(8);
    const json = Buffer.from(this.#o.vtpm.info(flags), 'utf8');
    if (offset >= json.length) return resultOnly(Res.BAD_PARAMETER);
    // swtpm sends the NUL-terminated string, up to PTM_GETINFO_SIZE bytes per request.
    const total = json.length + 1;
    const chunk = Buffer.concat([json, Buffer.from([0])]).subarray(offset, offset + GETINFO_SIZE);
    return Buffer.concat([u32s(Res.SUCCESS, total, chunk.length), chunk]);
  }

  async #getStateBlob(p: Buffer): Promise<Buffer> {
    const type = p.readUInt32BE(4);
    const offset = p.readUInt32BE(8);
    const kind = KIND_OF_TYPE[type];
    // Errors here keep the full 16-byte header, as swtpm's GET_STATEBLOB does; swtpm 0.7.1 answers an
    // unknown type like a missing blob (TPM_RETRY), measured.
    if (!kind) return u32s(Res.RETRY, 0, 0, 0);
    let blob: Uint8Array | null;
    try {
      blob = await this.#o.vtpm.getStateBlob(kind);
    } catch (err) {
      this.#o.log(`vTPM ${this.#o.vtpm.instance}: GET_STATEBLOB ${kind}: ${(err as Error).message}`);
      return u32s(Res.FAIL, 0, 0, 0);
    }
    if (!blob) return u32s(Res.RETRY, 0, 0, 0);
    // Sockets get the whole rest of the blob at once (totlength = length); QEMU insists on that.
    const rest = blob.subarray(Math.min(offset, blob.length));
    return Buffer.concat([u32s(Res.SUCCESS, 0, rest.length, rest.length), rest]);
  }

  async #setStateBlob(p: Buffer, blob: Buffer, running: boolean): Promise<Buffer> {
    const flags = p.readUInt32BE(0);
    const type = p.readUInt32BE(4);
    if (running) return resultOnly(Res.BAD_ORDINAL);
    const kind = KIND_OF_TYPE[type];
    if (!kind) return resultOnly(Res.BAD_PARAMETER);
    // File-key encryption we cannot undo: swtpm 0.7.1 without --key answers TPM_FAIL (measured).
    if (flags & STATE_FLAG_ENCRYPTED) return resultOnly(Res.FAIL);
    try {
      await this.#o.vtpm.setStateBlob(kind, blob);
      this.#o.log(`vTPM ${this.#o.vtpm.instance}: SET_STATEBLOB ${kind} (${blob.length} bytes)`);
      return resultOnly(Res.SUCCESS);
    } catch (err) {
      this.#o.log(`vTPM ${this.#o.vtpm.instance}: SET_STATEBLOB ${kind}: ${(err as Error).message}`);
      if (err instanceof StateBlobError) {
        // A blob sealed with the state file key: TPM_FAIL; with a migration key: TPM_KEYNOTFOUND (swtpm 0.7.1).
        if (err.code === 'ENCRYPTED') return resultOnly(blob.readUInt16BE(4) & 0x01 ? Res.FAIL : Res.KEYNOTFOUND);
        if (err.code === 'VERSION') return resultOnly(Res.BAD_VERSION);
        if (err.code === 'HDRSIZE') return resultOnly(Res.BAD_DATASIZE);
        return resultOnly(Res.BAD_PARAMETER);
      }
      const rc = (err as { tpmResult?: number }).tpmResult;
      return resultOnly(typeof rc === 'number' && rc !== 0 ? rc : Res.FAIL);
    }
  }

  /** Run one data-channel command at the locality the control channel set. */
  async execute(command: Uint8Array): Promise<Uint8Array> {
    const obs = this.#o.observer;
    if (!obs) return this.#o.vtpm.execute(command, { locality: this.#locality });
    const t0 = performance.now();
    let response: Uint8Array | null = null;
    try {
      return (response = await this.#o.vtpm.execute(command, { locality: this.#locality }));
    } finally {
      obs.done(command, response, t0);
    }
  }

  /**
   * The vTPM now belongs to another endpoint (a local live migration's destination, qemu-incoming.ts):
   * the data channel is dropped, whatever control request is queued is answered TPM_FAIL, and the
   * endpoint closes. Resolves once nothing of this endpoint can touch the vTPM any more.
   */
  async fence(reason: string): Promise<void> {
    if (this.#fenced !== null) return;
    this.#fenced = reason;
    this.#o.log(`fenced: ${reason}`);
    this.#data?.close();
    this.#data = null;
    await this.#chain;
    await this.close(true);
  }

  /**
   * Stop listening and drop every connection (after their queued replies with `afterWrites`); the vTPM
   * itself is the caller's to release.
   */
  async close(afterWrites = false): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const c of this.#conns) c.close(afterWrites);
    this.#data?.close();
    this.#data = null;
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    await this.#chain;
    try {
      fs.unlinkSync(this.path);
    } catch {
      /* already gone */
    }
  }
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}
