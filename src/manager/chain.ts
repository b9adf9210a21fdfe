// A stored blob with appended pieces (docs/manager-storage.md, "Appended pieces"): the base envelope
// followed by sealed pieces, each written to the log on its own and joined only when a checkpoint
// writes the blob as one file. A blob with no pieces is stored as its bare envelope, as always.
//
//   chain = magic "VTPMCHAN" | base length u32 | base envelope | (piece length u32 | sealed piece)*
//
// The framing is not authenticated: each piece's AAD binds its instance, base, predecessor and offset
// (seal.ts), and the metadata names the last piece's generation, so a cut, reordered or spliced chain
// fails to open.

const MAGIC = Buffer.from('VTPMCHAN', 'ascii');
const HEAD = MAGIC.length + 4;

export class ChainError extends Error {
  constructor(
    readonly code: 'FORMAT',
    message: string,
  ) {
    super(message);
    this.name = 'ChainError';
  }
}

export function isChain(b: Uint8Array): boolean {
  return b.length >= HEAD && MAGIC.equals(b.subarray(0, MAGIC.length));
}

/** `data` (a bare envelope or a chain) with `pieces` appended after it, as one buffer. */
export function chainBytes(data: Uint8Array, pieces: readonly Uint8Array[]): Uint8Array {
  if (pieces.length === 0) return data;
  const parts: Uint8Array[] = [];
  if (!isChain(data)) {
    const head = Buffer.allocUnsafe(HEAD);
    MAGIC.copy(head, 0);
    head.writeUInt32BE(data.length, MAGIC.length);
    parts.push(head);
  }
  parts.push(data);
  for (const p of pieces) {
    const len = Buffer.allocUnsafe(4);
    len.writeUInt32BE(p.length, 0);
    parts.push(len, p);
  }
  return Buffer.concat(parts);
}

/** The base envelope and the pieces of a chain; a bare envelope is its own base. Lengths are checked before use. */
export function splitChain(b: Uint8Array): { base: Buffer; pieces: Buffer[] } {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  if (!isChain(buf)) return { base: buf, pieces: [] };
  const baseLen = buf.readUInt32BE(MAGIC.length);
  if (HEAD + baseLen > buf.length) throw new ChainError('FORMAT', `chain's base of ${baseLen} bytes runs past its ${buf.length} bytes`);
  const pieces: Buffer[] = [];
  let o = HEAD + baseLen;
  while (o < buf.length) {
    if (o + 4 > buf.length) throw new ChainError('FORMAT', `chain cut inside a piece length at offset ${o}`);
    const n = buf.readUInt32BE(o);
    if (o + 4 + n > buf.length) throw new ChainError('FORMAT', `chain piece of ${n} bytes at offset ${o} runs past the end`);
    pieces.push(buf.subarray(o + 4, o + 4 + n));
    o += 4 + n;
  }
  return { base: buf.subarray(HEAD, HEAD + baseLen), pieces };
}
