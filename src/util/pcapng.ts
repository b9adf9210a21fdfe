// A pcapng file writer (the block layout of draft-ietf-opsawg-pcapng: Section Header, Interface
// Description and Enhanced Packet blocks, little-endian, microsecond timestamps). Blocks are built in
// memory and written off the caller's path: at 64 KiB, every 200 ms, and at close. The file stops
// growing at `maxBytes`; what did not fit is counted. Imports nothing of ours.
import fs from 'node:fs';

export const LINKTYPE_RAW = 101;
export const LINKTYPE_USER0 = 147;

const FLUSH_AT = 64 * 1024;
const SNAPLEN = 0x40000;

function pad4(n: number): number {
  return (n + 3) & ~3;
}

/** Microseconds since the Unix epoch, from the monotonic clock anchored at process start. */
export function nowMicros(): bigint {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000));
}

export class PcapngWriter {
  readonly path: string;
  readonly #fd: number;
  readonly #maxBytes: number;
  #chunks: Buffer[] = [];
  #pending = 0;
  #written = 0;
  #writing: Promise<void> = Promise.resolve();
  readonly #timer: NodeJS.Timeout;
  #closed = false;
  /** Packets left out because the file reached its size bound. */
  dropped = 0;
  /** Called once when the size bound is first reached. */
  onFull: (() => void) | null = null;

  /** Create (truncate) `path`, mode 0600, with one interface per entry of `linkTypes`. */
  constructor(path: string, linkTypes: number[], maxBytes: number) {
    this.path = path;
    this.#maxBytes = maxBytes;
    this.#fd = fs.openSync(path, 'w', 0o600);
    this.#push(sectionHeader());
    for (const lt of linkTypes) this.#push(interfaceDescription(lt));
    this.#timer = setInterval(() => this.#flush(), 200);
    this.#timer.unref();
  }

  /** One packet on interface `ifIndex`, its bytes the concatenation of `parts`. */
  packet(ifIndex: number, ts: bigint, parts: Uint8Array[]): void {
    if (this.#closed) return;
    let len = 0;
    for (const p of parts) len += p.length;
    const total = 32 + pad4(len);
    if (this.#written + this.#pending + total > this.#maxBytes) {
      if (this.dropped++ === 0) this.onFull?.();
      return;
    }
    const b = Buffer.alloc(total);
    b.writeUInt32LE(0x00000006, 0);
    b.writeUInt32LE(total, 4);
    b.writeUInt32LE(ifIndex, 8);
    b.writeUInt32LE(Number(ts >> 32n), 12);
    b.writeUInt32LE(Number(ts & 0xffffffffn), 16);
    b.writeUInt32LE(len, 20);
    b.writeUInt32LE(len, 24);
    let off = 28;
    for (const p of parts) {
      b.set(p, off);
      off += p.length;
    }
    b.writeUInt32LE(total, total - 4);
    this.#push(b);
  }

  #push(b: Buffer): void {
    this.#chunks.push(b);
    this.#pending += b.length;
    if (this.#pending >= FLUSH_AT) this.#flush();
  }

  #flush(): void {
    if (this.#pending === 0) return;
    const data = Buffer.concat(this.#chunks);
    this.#chunks = [];
    this.#written += data.length;
    this.#pending = 0;
    this.#writing = this.#writing.then(
      () =>
        new Promise<void>((resolve) => {
          const write = (off: number): void => {
            if (off >= data.length) return resolve();
            fs.write(this.#fd, data, off, data.length - off, null, (err, n) => (err ? resolve() : write(off + n)));
          };
          write(0);
        }),
    );
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
