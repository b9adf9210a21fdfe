// The vTPM-domain side of the lifecycle frames: one TPM instance hosted alone in this process, with its
// own domid, powered, started, saved and stopped by the backend (src/backend/vtpm-domain.ts) over a
// byte-stream transport (stdio). TPM commands do not come this way: they arrive on the shared-memory
// ring the caller attaches in `onInstance` (src/backend/vtpm-domain-main.ts).
import { TpmHost } from './host.js';
import type { TpmInstance, TpmVersion } from './instance.js';
import { BLOB_TYPE } from './state-blob.js';
import type { StateKind, StateStore } from './state-store.js';
import {
  DomainMsg,
  FrameReader,
  encodeFrame,
  encodeJson,
  type DomainHealth,
  type Frame,
} from './domain-protocol.js';

export interface DomainTransport {
  write(frame: Uint8Array): void;
  onData(cb: (chunk: Uint8Array) => void): void;
  /** The peer went away (parent died or closed the channel). */
  onClose(cb: () => void): void;
  close(): void;
}

/** Frames over this process's stdin (requests) and stdout (replies). */
export function stdioTransport(): DomainTransport {
  return {
    write: (frame) => void process.stdout.write(frame),
    onData: (cb) => void process.stdin.on('data', (c: Buffer) => cb(new Uint8Array(c.buffer, c.byteOffset, c.byteLength))),
    onClose: (cb) => {
      process.stdin.on('end', cb);
      process.stdin.on('close', cb);
    },
    close: () => {
      process.stdin.pause();
    },
  };
}

export interface DomainOptions {
  instance: number;
  domid: number;
  version: TpmVersion;
  store: StateStore;
  transport: DomainTransport;
  /** InstanceOptions.inline; a domain hosting one TPM alone can run the fast commands inline. */
  inline?: 'never' | 'fast';
  /** Called with the instance once it runs, before READY (multi-VM mode attaches its ring here). */
  onInstance?: (inst: TpmInstance) => Promise<void> | void;
}

const KIND_OF_TYPE: Record<number, StateKind> = Object.fromEntries(
  Object.entries(BLOB_TYPE).map(([k, v]) => [v, k as StateKind]),
);

/** Run the domain until STOP or until the transport closes. Resolves with the exit code to use. */
export async function runDomain(opts: DomainOptions): Promise<number> {
  const started = Date.now();
  const host = new TpmHost();
  const tr = opts.transport;
  let inst: TpmInstance;
  try {
    inst = await host.create({ instance: opts.instance, version: opts.version, store: opts.store, inline: opts.inline });
  } catch (err) {
    tr.write(encodeJson(DomainMsg.ERROR, 0, errorBody(err)));
    return 1;
  }
  inst.on('failure', (info) => tr.write(encodeJson(DomainMsg.FAILURE, 0, info)));
  try {
    await opts.onInstance?.(inst);
  } catch (err) {
    await host.destroyAll().catch(() => undefined);
    tr.write(encodeJson(DomainMsg.ERROR, 0, errorBody(err)));
    return 1;
  }

  const health = (): DomainHealth => ({
    instance: opts.instance,
    domid: opts.domid,
    pid: process.pid,
    version: opts.version,
    status: inst.status,
    busy: inst.busy,
    rssKiB: Math.round(process.memoryUsage.rss() / 1024),
    uptimeMs: Date.now() - started,
  });

  const handle = async (f: Frame): Promise<Uint8Array> => {
    switch (f.type) {
      case DomainMsg.HEALTH:
        return new TextEncoder().encode(JSON.stringify(health()));
      case DomainMsg.POWER_ON:
        await inst.powerOn();
        return new Uint8Array(0);
      case DomainMsg.POWER_OFF:
        await inst.powerOff();
        return new Uint8Array(0);
      case DomainMsg.RESET:
        await inst.reset();
        return new Uint8Array(0);
      case DomainMsg.SAVE_VOLATILE:
        await inst.saveVolatile();
        return new Uint8Array(0);
      case DomainMsg.STARTUP: {
        const rc = await inst.startup(f.payload[0] === 1 ? 'state' : 'clear');
        const out = new Uint8Array(4);
        new DataView(out.buffer).setUint32(0, rc);
        return out;
      }
      case DomainMsg.GET_BLOB:
        return (await inst.getStateBlob(kindOf(f.payload[0]))) ?? new Uint8Array(0);
      case DomainMsg.SET_BLOB:
        await inst.setStateBlob(kindOf(f.payload[0]), f.payload.subarray(1));
        return new Uint8Array(0);
      default:
        throw Object.assign(new Error(`message type 0x${f.type.toString(16)} is not a request`), { code: 'BAD_REQUEST' });
    }
  };

  // STOP or a closed channel: the instance goes with the domain (its stores already hold what is durable).
  return serveControl(tr, handle, health, () => host.destroyAll().catch(() => undefined));
}

/**
 * Serve the lifecycle frames on `tr`: READY (with `health()`) first, then each request answered OK with
 * `handle`'s result or ERROR with its code, until STOP (answered after `stop` finished) or the channel
 * closes. A stream that breaks the framing cannot be resynchronised: one ERROR, then exit code 2.
 */
export function serveControl(
  tr: DomainTransport,
  handle: (f: Frame) => Promise<Uint8Array>,
  health: () => DomainHealth,
  stop: () => Promise<void>,
): Promise<number> {
  return new Promise<number>((resolve) => {
    let done = false;
    const finish = async (code: number, replyId?: number): Promise<void> => {
      if (done) return;
      done = true;
      await stop();
      if (replyId !== undefined) tr.write(encodeFrame(DomainMsg.OK, replyId));
      tr.close();
      resolve(code);
    };
    const reader = new FrameReader();
    tr.onData((chunk) => {
      let frames: Frame[];
      try {
        frames = reader.push(chunk);
      } catch (err) {
        tr.write(encodeJson(DomainMsg.ERROR, 0, errorBody(err)));
        void finish(2);
        return;
      }
      for (const f of frames) {
        if (f.type === DomainMsg.STOP) {
          void finish(0, f.id);
          continue;
        }
        handle(f).then(
          (result) => tr.write(encodeFrame(DomainMsg.OK, f.id, result)),
          (err: unknown) => tr.write(encodeJson(DomainMsg.ERROR, f.id, errorBody(err))),
        );
      }
    });
    tr.onClose(() => void finish(0));
    tr.write(encodeJson(DomainMsg.READY, 0, health()));
  });
}

function kindOf(type: number | undefined): StateKind {
  const k = type === undefined ? undefined : KIND_OF_TYPE[type];
  if (!k) throw Object.assign(new Error(`unknown state blob type ${String(type)}`), { code: 'BAD_BLOB_TYPE' });
  return k;
}

function errorBody(err: unknown): { code: string; message: string } {
  const e = err as { code?: unknown; message?: unknown };
  return {
    code: typeof e?.code === 'string' ? e.code : 'ERROR',
    message: typeof e?.message === 'string' ? e.message : String(err),
  };
}

