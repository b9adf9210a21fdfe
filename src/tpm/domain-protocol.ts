// The lifecycle framing between a backend and a vTPM-domain process (one TPM instance alone in a process
// with its own domid; TPM commands go over a shared-memory ring instead). Its stdin/stdout carry frames:
//
//   length u32 BE (bytes after this field, >= 5) | type u8 | id u32 BE | payload
//
// Requests carry an id the reply repeats. Replies: OK (payload = result bytes) or ERROR (payload =
// UTF-8 JSON {code, message}). The child speaks first with READY (id 0, JSON) and may send FAILURE
// events (id 0, JSON FailureInfo) at any time.

export enum DomainMsg {
  HEALTH = 0x03, // reply: JSON DomainHealth
  POWER_ON = 0x04,
  POWER_OFF = 0x05,
  RESET = 0x06,
  SAVE_VOLATILE = 0x07,
  GET_BLOB = 0x08, // payload: kind u8 (swtpm blob type 1..3); reply: blob, empty when none
  SET_BLOB = 0x09, // payload: kind u8, blob
  STOP = 0x0a, // destroy the instance, reply, exit 0
  STARTUP = 0x0b, // payload: u8 0 clear / 1 state; reply: response code u32
  OK = 0x80,
  ERROR = 0x81,
  READY = 0x82,
  FAILURE = 0x83,
}

export const FRAME_HEADER = 4;
const MIN_BODY = 5;
/** Largest frame accepted: a TPM 2 permanent state with full NV stays far below this. */
export const MAX_FRAME = 4 << 20;

export interface Frame {
  type: DomainMsg;
  id: number;
  payload: Uint8Array;
}

export interface DomainHealth {
  instance: number;
  domid: number;
  pid: number;
  version: '2.0' | '1.2';
  status: string;
  busy: boolean;
  rssKiB: number;
  uptimeMs: number;
}

export type DomainProtocolErrorCode = 'FRAME_TOO_LARGE' | 'FRAME_TOO_SHORT' | 'BAD_TYPE';

export class DomainProtocolError extends Error {
  constructor(
    readonly code: DomainProtocolErrorCode,
    message: string,
  ) {
    super(`vTPM domain protocol: ${message}`);
    this.name = 'DomainProtocolError';
  }
}

const KNOWN = new Set<number>(Object.values(DomainMsg).filter((v): v is number => typeof v === 'number'));

export function encodeFrame(type: DomainMsg, id: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const body = MIN_BODY + payload.length;
  if (body > MAX_FRAME) throw new DomainProtocolError('FRAME_TOO_LARGE', `frame of ${body} bytes > ${MAX_FRAME}`);
  const out = new Uint8Array(FRAME_HEADER + body);
  const v = new DataView(out.buffer);
  v.setUint32(0, body);
  v.setUint8(4, type);
  v.setUint32(5, id >>> 0);
  out.set(payload, 9);
  return out;
}

export function encodeJson(type: DomainMsg, id: number, value: unknown): Uint8Array {
  return encodeFrame(type, id, new TextEncoder().encode(JSON.stringify(value)));
}

export function decodeJson<T>(payload: Uint8Array): T {
  return JSON.parse(new TextDecoder().decode(payload)) as T;
}

const GET_LENGTH = 0;
const GET_BODY = 1;

/**
 * Reassembles frames from arbitrary chunks. An explicit two-state machine: GET_LENGTH reads the 4-byte
 * length (checked against the limits before any allocation), GET_BODY collects exactly that many bytes.
 * A violation throws DomainProtocolError; the stream is unusable afterwards.
 */
export class FrameReader {
  #state = GET_LENGTH;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #need = FRAME_HEADER;

  /** Feed bytes; returns every frame they completed. */
  push(chunk: Uint8Array): Frame[] {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    const frames: Frame[] = [];
    while (this.#buffered >= this.#need) {
      const bytes = this.#take(this.#need);
      if (this.#state === GET_LENGTH) {
        const len = new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0);
        if (len < MIN_BODY) throw new DomainProtocolError('FRAME_TOO_SHORT', `frame length ${len} < ${MIN_BODY}`);
        if (len > MAX_FRAME) throw new DomainProtocolError('FRAME_TOO_LARGE', `frame length ${len} > ${MAX_FRAME}`);
        this.#state = GET_BODY;
        this.#need = len;
      } else {
        const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        const type = v.getUint8(0);
        if (!KNOWN.has(type)) throw new DomainProtocolError('BAD_TYPE', `unknown message type 0x${type.toString(16)}`);
        frames.push({ type: type as DomainMsg, id: v.getUint32(1), payload: bytes.slice(MIN_BODY) });
        this.#state = GET_LENGTH;
        this.#need = FRAME_HEADER;
      }
    }
    return frames;
  }

  #take(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      const c = this.#chunks[0]!;
      const k = Math.min(c.length, n - got);
      out.set(c.subarray(0, k), got);
      got += k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    this.#buffered -= n;
    return out;
  }
}
