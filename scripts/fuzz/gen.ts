// Seeded generators of hostile inputs for `npm run fuzz` (docs/fuzzing.md): one PRNG per target,
// derived from the run's seed, so a run is reproduced by its --seed alone. Inputs are mostly
// well-framed with hostile contents (so they reach the parsers behind the framing), plus a share of
// framing violations that must cut their sender off.

/** mulberry32: small, fast, and the same on every machine. */
export class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  u32(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** 0 .. n-1 */
  int(n: number): number {
    return this.u32() % n;
  }
  chance(p: number): boolean {
    return this.u32() < p * 0x100000000;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
  /** A length biased to the small and the boundaries. */
  len(max: number): number {
    return this.chance(0.7) ? this.int(Math.min(64, max) + 1) : this.chance(0.5) ? this.int(max + 1) : this.pick([0, 1, max - 1, max].filter((x) => x >= 0));
  }
}

/** The seed of one target's generator. */
export function targetSeed(seed: number, target: string): number {
  let h = seed >>> 0;
  for (const c of target) h = Math.imul(h ^ c.charCodeAt(0), 0x9e3779b1) >>> 0;
  return h;
}

// TPM 2.0 and 1.2 command codes worth aiming at, plus whatever the generator makes up.
const TPM2_CC = [0x144, 0x145, 0x17b, 0x17a, 0x17e, 0x182, 0x131, 0x15b, 0x153, 0x176, 0x165, 0x121, 0x16b, 0x18f, 0x11f, 0x193];
const TPM12_ORD = [0x46, 0x99, 0x65, 0x14, 0x15, 0x17, 0xf1];

/** A TPM command with a plausible or hostile header and random parameters, at most `max` bytes. */
export function tpmCommand(r: Rng, max: number): Buffer {
  const b = r.bytes(Math.min(max, r.chance(0.05) ? r.int(10) : 10 + r.len(max - 10)));
  if (b.length < 10) return b;
  const tpm2 = r.chance(0.8);
  b.writeUInt16BE(r.chance(0.9) ? (tpm2 ? r.pick([0x8001, 0x8002]) : r.pick([0x00c1, 0x00c2, 0x00c3])) : r.int(0x10000), 0);
  b.writeUInt32BE(r.chance(0.85) ? b.length : r.chance(0.5) ? r.int(b.length + 16) : r.u32(), 2);
  b.writeUInt32BE(r.chance(0.9) ? (tpm2 ? r.pick(TPM2_CC) : r.pick(TPM12_ORD)) : r.u32(), 6);
  return b;
}

// ---- xs_wire ------------------------------------------------------------------------------------

const PATH_PARTS = ['data', 'device', 'vtpm', '0', 'ring-ref', 'state', 'x', '@introduceDomain', '@releaseDomain', 'control', 'a-b_c', '..', ''];

function xsPath(r: Rng, domid: number): string {
  if (r.chance(0.1)) return r.bytes(r.len(40)).toString('latin1');
  const rel = Array.from({ length: 1 + r.int(4) }, () => r.pick(PATH_PARTS)).join('/');
  switch (r.int(6)) {
    case 0:
      return `/local/domain/${domid}/${rel}`;
    case 1:
      return `/local/domain/${r.pick([0, 1, 2, domid + 1, r.int(70000)])}/${rel}`;
    case 2:
      return r.pick(['/', '/local', '/local/domain', '/tool', '/vm', '/libxl']);
    case 3:
      return 'x'.repeat(r.pick([2048, 2049, 3072, 3073, 10]));
    default:
      return rel;
  }
}

/** One xs_wire request frame from a guest: header (type, req_id, tx_id, len) and payload. */
export function xsFrame(r: Rng, domid: number, txIds: readonly number[]): Buffer {
  const type = r.chance(0.92) ? r.int(27) : r.chance(0.5) ? r.int(0x10000) : r.u32();
  const args: string[] = [];
  const n = r.pick([1, 1, 2, 2, 3, 0, 4]);
  for (let i = 0; i < n; i++) {
    args.push(i === 0 ? xsPath(r, domid) : r.pick([String(r.int(100)), `n${r.int(200)}`, 'T', 'F', `r${r.int(5)}`, `b${domid}`, r.bytes(r.len(64)).toString('latin1')]));
  }
  let payload = Buffer.from(args.map((a) => `${a}\0`).join(''), 'latin1');
  if (r.chance(0.15)) payload = payload.subarray(0, Math.max(0, payload.length - 1)); // no final NUL
  if (r.chance(0.1)) payload = Buffer.concat([payload, r.bytes(r.len(2048))]); // a WRITE value or junk
  if (payload.length > 4096) payload = payload.subarray(0, 4096);
  const txId = r.chance(0.75) ? 0 : txIds.length && r.chance(0.6) ? r.pick(txIds) : r.chance(0.5) ? r.int(30) : r.u32();
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeUInt32LE(r.u32(), 4);
  h.writeUInt32LE(txId, 8);
  // a length past XENSTORE_PAYLOAD_MAX is a framing violation: the connection must be cut off
  const violation = r.chance(0.01);
  h.writeUInt32LE(violation ? r.pick([4097, 0x10000, 0xffffffff, 4097 + r.int(1 << 20)]) : payload.length, 12);
  return violation ? h : Buffer.concat([h, payload]);
}

// ---- swtpm control channel ----------------------------------------------------------------------

/** Payload bytes after the code for each control command (swtpm's ptm structs). */
const CTRL_PAYLOAD: Record<number, number> = { 1: 0, 2: 4, 3: 0, 4: 0, 5: 1, 6: 0, 7: 0, 8: 1, 9: 0, 0x0c: 12, 0x0e: 0, 0x0f: 0, 0x10: 0, 0x11: 4, 0x12: 16, 0x13: 0 };

/** One control message: a known or unknown code, and a payload of the right, short or long size. */
export function ctrlMessage(r: Rng): Buffer {
  const known = Object.keys(CTRL_PAYLOAD).map(Number);
  // SET_STATEBLOB (0x0d) with a random blob: the header says how much follows
  const code = r.chance(0.9) ? r.pick([...known, 0x0d]) : r.chance(0.5) ? r.int(0x20) : r.u32();
  const head = Buffer.alloc(4);
  head.writeUInt32BE(code >>> 0, 0);
  if (code === 0x0d) {
    const blob = r.bytes(r.len(2048));
    const p = Buffer.alloc(12);
    p.writeUInt32BE(r.chance(0.8) ? 0 : r.u32(), 0);
    p.writeUInt32BE(r.chance(0.8) ? 1 + r.int(3) : r.u32(), 4);
    p.writeUInt32BE(blob.length, 8);
    return Buffer.concat([head, p, blob]);
  }
  const want = CTRL_PAYLOAD[code] ?? r.int(32);
  // a payload shorter than the command needs would wait for the 500 ms deadline: rare
  const size = r.chance(0.9) ? want : r.chance(0.8) ? want + 1 + r.int(16) : r.int(want + 1);
  return Buffer.concat([head, r.bytes(size)]);
}

// ---- manager frames -----------------------------------------------------------------------------

const MGR_ORD = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x01000001, 0x01000002, 0x01000003, 0x01000004, 0x01000005, 0x100];

/**
 * One frame on a client FIFO: instance u32 | tag u16 | size u32 | ordinal u32 | params (big-endian),
 * addressed mostly to the client's own instance; a share of bad tags and sizes (framing violations).
 */
export function managerFrame(r: Rng, instance: number): Buffer {
  const params = r.bytes(r.len(1024));
  const b = Buffer.alloc(14 + params.length);
  b.writeUInt32BE(r.chance(0.85) ? instance : r.chance(0.5) ? r.int(16) : r.u32(), 0);
  const violation = r.chance(0.02);
  b.writeUInt16BE(violation && r.chance(0.5) ? r.int(0x10000) : 0x01c1, 4);
  b.writeUInt32BE(violation ? r.pick([0, 9, 0xffffffff, 9 * 1024 * 1024]) : 10 + params.length, 6);
  b.writeUInt32BE(r.chance(0.9) ? r.pick(MGR_ORD) : r.u32(), 10);
  params.copy(b, 14);
  return b;
}
