// A pcapng file writer (the block layout of draft-ietf-opsawg-pcapng: Section Header, Interface
// Description and Enhanced Packet blocks, little-endian, microsecond timestamps). Packets are written
// straight into a 1 MiB chunk in memory (no allocation per packet); full chunks, and every 200 ms what
// there is, go to the file off the caller's path. The file stops growing at `maxBytes`, and packets are
// also left out while more than MAX_QUEUED bytes wait for the disk; both are counted. Imports nothing of ours.
import fs from 'node:fs';

export const LINKTYPE_RAW = 101;
export const LINKTYPE_USER0 = 147;

const CHUNK = 1 << 20;
const MAX_QUEUED = 16 << 20;
const SNAPLEN = 0x40000;
const TWO32 = 4294967296;

function pad4(n: number): number {
  return (n + 3) & ~3;
}

/** Microseconds since the Unix epoch, from the monotonic clock anchored at process start. */
export function nowMicros(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

/** performance.now() reading `t` as microseconds since the Unix epoch. */
export function microsAt(t: number): number {
  return Math.round((performance.timeOrigin + t) * 1000);
}

export class PcapngWriter {
  readonly path: string;
  readonly #fd: number;
  readonly #maxBytes: number;
  /** The chunk packets are written into, and how much of it is used. */
  buf: Buffer = Buffer.allocUnsafe(CHUNK);
  #off = 0;
  /** Bytes handed to the file or queued for it. */
  #committed = 0;
  #queued = 0;
  #writing: Promise<void> = Promise.resolve();
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
    if (this.#committed + this.#off + total > this.#maxBytes || this.#queued > MAX_QUEUED) {
      if (this.dropped++ === 0 && this.#queued <= MAX_QUEUED) this.onFull?.();
      return -1;
    }
    if (this.#off + total > this.buf.length) this.#flush(total);
    const b = this.buf;
    const o = this.#off;
    const hi = Math.floor(micros / TWO32);
    b.writeUInt32LE(0x00000006, o);
    b.writeUInt32LE(total, o + 4);
    b.writeUInt32LE(ifIndex, o + 8);
    b.writeUInt32LE(hi, o + 12);
    b.writeUInt32LE(micros - hi * TWO32, o + 16);
    b.writeUInt32LE(len, o + 20);
    b.writeUInt32LE(len, o + 24);
    for (let i = o + 28 + len; i < o + total - 4; i++) b[i] = 0; // padding
    b.writeUInt32LE(total, o + total - 4);
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

  /** Hand what the chunk holds to the file; a new chunk takes the next packets (at least `need` bytes). */
  #flush(need = 0): void {
    if (this.#off > 0) {
      // A full chunk goes to the write as it is; a timer's few packets are copied out and the chunk kept.
      const handOver = need > 0 || this.#off > CHUNK / 2;
      const data = handOver ? this.buf.subarray(0, this.#off) : Buffer.from(this.buf.subarray(0, this.#off));
      this.#committed += data.length;
      this.#queued += data.length;
      this.#writing = this.#writing.then(
        () =>
          new Promise<void>((resolve) => {
            const write = (off: number): void => {
              if (off >= data.length) {
                this.#queued -= data.length;
                if (handOver && data.buffer.byteLength === CHUNK && this.#spare.length < 2) this.#spare.push(Buffer.from(data.buffer, data.byteOffset, CHUNK));
                return resolve();
              }
              fs.write(this.#fd, data, off, data.length - off, null, (err, n) => (err ? resolve() : write(off + n)));
            };
            write(0);
          }),
      );
      if (handOver) this.buf = (need <= CHUNK ? this.#spare.pop() : undefined) ?? Buffer.allocUnsafe(Math.max(CHUNK, need));
      this.#off = 0;
    } else if (need > this.buf.length) this.buf = Buffer.allocUnsafe(need);
  }

  /** Write what is buffered and close the file. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    this.#flush();
    await this.#writing;
    fs.closeSync(this.#fd);
  }
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
