// A pcapng file writer (the block layout of draft-ietf-opsawg-pcapng: Section Header, Interface
// Description and Enhanced Packet blocks, little-endian, microsecond timestamps). Packets are written
// straight into a 1 MiB chunk in memory at known offsets (a DataView; no allocation per packet); full
// chunks, and every 200 ms what there is, go to the file in one writev on the thread pool. The file stops growing at `maxBytes`, and packets are
// also left out while more than MAX_QUEUED bytes wait for the disk; both are counted. Imports nothing of ours.
import fs from 'node:fs';

export const LINKTYPE_RAW = 101;
export const LINKTYPE_USER0 = 147;

const CHUNK = 1 << 20;
/** The most the 200 ms flush copies out of the chunk (a few µs); more and the chunk itself is queued. */
const COPY_MAX = 64 << 10;
const MAX_QUEUED = 16 << 20;
const SNAPLEN = 0x40000;
const TWO32 = 4294967296;

function pad4(n: number): number {
  return (n + 3) & ~3;
}

/** The clock's anchor, read once (the getter is not free). */
const ORIGIN = performance.timeOrigin;

/** Microseconds since the Unix epoch, from the monotonic clock anchored at process start: one clock read. */
export function nowMicros(): number {
  return Math.round((ORIGIN + performance.now()) * 1000);
}

/** performance.now() reading `t` as microseconds since the Unix epoch. */
export function microsAt(t: number): number {
  return Math.round((ORIGIN + t) * 1000);
}

export class PcapngWriter {
  readonly path: string;
  readonly #fd: number;
  readonly #maxBytes: number;
  /** The chunk packets are written into, how much of it is used, and a DataView on it for the header fields. */
  buf: Buffer = Buffer.allocUnsafe(CHUNK);
  view: DataView = viewOf(this.buf);
  #off = 0;
  /** Bytes handed to the file or queued for it. */
  #committed = 0;
  /** Chunks waiting for the disk (written together, one writev), their bytes, and whether a write runs. */
  #queue: Buffer[] = [];
  #queued = 0;
  #writing = false;
  #idle: Array<() => void> = [];
  #failed = false;
  /** Chunks whose write finished, reused (allocating 1 MiB per chunk would keep the GC busy). */
  readonly #spare: Buffer[] = [];
  readonly #timer: NodeJS.Timeout;
  #closed = false;
  /** Packets left out (file at its bound, or the disk behind). */
  dropped = 0;
  /** Called once when the size bound is first reached. */
  onFull: (() => void) | null = null;

  /** Create (truncate) `path`, mode 0600, with one interface per entry of `linkTypes`. */
  constructor(path: string, linkTypes: number[], maxBytes: number) {
    this.path = path;
    this.#maxBytes = maxBytes;
    this.#fd = fs.openSync(path, 'w', 0o600);
    this.#raw(sectionHeader());
    for (const lt of linkTypes) this.#raw(interfaceDescription(lt));
    this.#timer = setInterval(() => this.#flush(), 200);
    this.#timer.unref();
  }

  /**
   * Start a packet of `len` bytes on interface `ifIndex` at `micros`: returns the offset in `buf` where
   * its bytes go (the caller writes exactly `len` there), or -1 when it is left out.
   */
  begin(ifIndex: number, micros: number, len: number): number {
    if (this.#closed) return -1;
    const total = 32 + pad4(len);
    if (this.#committed + this.#off + total > this.#maxBytes || this.#queued > MAX_QUEUED || this.#failed) {
      if (this.dropped++ === 0 && this.#queued <= MAX_QUEUED && !this.#failed) this.onFull?.();
      return -1;
    }
    if (this.#off + total > this.buf.length) this.#flush(total);
    const v = this.view;
    const o = this.#off;
    const hi = Math.floor(micros / TWO32);
    v.setUint32(o, 0x00000006, true);
    v.setUint32(o + 4, total, true);
    v.setUint32(o + 8, ifIndex, true);
    v.setUint32(o + 12, hi, true);
    v.setUint32(o + 16, micros - hi * TWO32, true);
    v.setUint32(o + 20, len, true);
    v.setUint32(o + 24, len, true);
    v.setUint32(o + total - 8, 0, true); // the padding (if any) is zero; the data overwrites the rest
    v.setUint32(o + total - 4, total, true);
    this.#off = o + total;
    return o + 28;
  }

  /** One packet whose bytes are the concatenation of `parts`. */
  packet(ifIndex: number, micros: number, parts: Uint8Array[]): void {
    let len = 0;
    for (const p of parts) len += p.length;
    let o = this.begin(ifIndex, micros, len);
    if (o < 0) return;
    for (const p of parts) {
      this.buf.set(p, o);
      o += p.length;
    }
  }

  #raw(block: Buffer): void {
    if (this.#off + block.length > this.buf.length) this.#flush(block.length);
    block.copy(this.buf, this.#off);
    this.#off += block.length;
  }

  /** Queue what the chunk holds for the file; a new chunk takes the next packets (at least `need` bytes). */
  #flush(need = 0): void {
    if (this.#off > 0) {
      // A full chunk goes to the queue as it is, and so does what the timer finds beyond COPY_MAX (copying
      // it would hold the loop, and the guest being answered, up); a few packets are copied out instead.
      const handOver = need > 0 || this.#off > COPY_MAX;
      const data = handOver ? this.buf.subarray(0, this.#off) : Buffer.from(this.buf.subarray(0, this.#off));
      this.#committed += data.length;
      this.#queued += data.length;
      this.#queue.push(data);
      if (handOver) {
        this.buf = (need <= CHUNK ? this.#spare.pop() : undefined) ?? Buffer.allocUnsafe(Math.max(CHUNK, need));
        this.view = viewOf(this.buf);
      }
      this.#off = 0;
      this.#pump();
    } else if (need > this.buf.length) {
      this.buf = Buffer.allocUnsafe(need);
      this.view = viewOf(this.buf);
    }
  }

  /** Write every queued chunk with one writev (the thread pool's, off the event loop), then any queued meanwhile. */
  #pump(): void {
    if (this.#writing) return;
    if (this.#queue.length === 0 || this.#failed) {
      this.#queue = [];
      this.#queued = 0;
      for (const f of this.#idle.splice(0)) f();
      return;
    }
    this.#writing = true;
    const bufs = this.#queue;
    this.#queue = [];
    const fail = (): void => {
      // The file cannot take more (EIO, ENOSPC): later packets are counted as left out.
      this.#failed = true;
      this.#writing = false;
      this.#pump();
    };
    const write = (): void => fs.writev(this.#fd, bufs.slice(), (err, n) => (err || n === 0 ? fail() : done(n)));
    const done = (n: number): void => {
      let left = n;
      while (bufs.length > 0 && left >= bufs[0]!.length) {
        const b = bufs.shift()!;
        left -= b.length;
        this.#queued -= b.length;
        if (b.buffer.byteLength === CHUNK && b.byteOffset === 0 && this.#spare.length < 2) this.#spare.push(Buffer.from(b.buffer, 0, CHUNK));
      }
      if (bufs.length > 0) {
        // A short write leaves a tail: write it next.
        this.#queued -= left;
        bufs[0] = bufs[0]!.subarray(left);
        return write();
      }
      this.#writing = false;
      this.#pump();
    };
    write();
  }

  /** Write what is buffered and close the file. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    this.#flush();
    if (this.#writing) await new Promise<void>((r) => this.#idle.push(r));
    fs.closeSync(this.#fd);
  }
}

function viewOf(b: Buffer): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function sectionHeader(): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32LE(0x0a0d0d0a, 0);
  b.writeUInt32LE(28, 4);
  b.writeUInt32LE(0x1a2b3c4d, 8); // byte-order magic
  b.writeUInt16LE(1, 12); // major
  b.writeUInt16LE(0, 14); // minor
  b.writeBigInt64LE(-1n, 16); // section length unknown
  b.writeUInt32LE(28, 24);
  return b;
}

function interfaceDescription(linkType: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32LE(0x00000001, 0);
  b.writeUInt32LE(20, 4);
  b.writeUInt16LE(linkType, 8);
  b.writeUInt16LE(0, 10);
  b.writeUInt32LE(SNAPLEN, 12);
  b.writeUInt32LE(20, 16);
  return b;
}
