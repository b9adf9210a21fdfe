// Which host owns which range of domain uids on this machine (docs/isolation.md). Under `uid`
// isolation a domain's processes are found, and stopped, by their uid alone; two hosts handing out the
// same uids would stop each other's guests at detach. So every host claims its range, BASE..BASE+RANGE-1,
// in a root-only directory: a host given --uid-base refuses a range a live host holds, and a host left
// to the default takes the first free range from the default base on.
import fs from 'node:fs';
import { join, resolve } from 'node:path';
import { IsolationError, UID_RANGE } from './isolation.js';
import { RunDir, alive } from './rundir.js';

/** One file per claimed range, named by its base; VTPM_UID_CLAIM_DIR moves it (tests of this module). */
export function claimDir(): string {
  return process.env.VTPM_UID_CLAIM_DIR || '/run/vtpm-split/uid-ranges';
}

interface Claim {
  base: number;
  runDir: string;
  /** The `host up` that claimed it: a range is held while that process starts the host. */
  pid: number;
  file: string;
}

function readClaims(dir: string): Claim[] {
  const out: Claim[] = [];
  for (const name of fs.readdirSync(dir)) {
    if (!/^\d+$/.test(name)) continue;
    const file = join(dir, name);
    try {
      const c = JSON.parse(fs.readFileSync(file, 'utf8')) as { runDir?: unknown; pid?: unknown };
      if (typeof c.runDir !== 'string' || typeof c.pid !== 'number') continue;
      out.push({ base: Number(name), runDir: c.runDir, pid: c.pid, file });
    } catch {
      // removed while listed, or half-written by a host up that died: not a live claim
    }
  }
  return out;
}

/** A claim holds while its `host up` runs or its host has a live process. */
function held(c: Claim): boolean {
  if (alive(c.pid)) return true;
  try {
    return new RunDir(c.runDir).readHost().processes.some((p) => alive(p.pid));
  } catch {
    return false;
  }
}

const overlaps = (a: number, b: number): boolean => a < b + UID_RANGE && b < a + UID_RANGE;

/**
 * Claim the uid range for the host in `runDir`: exactly `base` when `explicit`, else the first free
 * range at base, base + RANGE, …. Claims of dead hosts are taken over. Returns the base claimed.
 */
export function claimUidRange(runDir: string, base: number, explicit: boolean): number {
  const dir = claimDir();
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const me = resolve(runDir);
  for (let b = base; b + UID_RANGE - 1 <= 0x7fffffff; b += UID_RANGE) {
    const near = readClaims(dir).filter((c) => overlaps(c.base, b));
    const other = near.find((c) => c.runDir !== me && held(c));
    if (other) {
      if (explicit) {
        throw new IsolationError('UID_RANGE_TAKEN', `uids ${b}..${b + UID_RANGE - 1} overlap those of the host in ${other.runDir} (uid base ${other.base}); give this host another --uid-base`);
      }
      continue;
    }
    for (const c of near) fs.rmSync(c.file, { force: true });
    try {
      // Exclusive create: of two host ups racing for one range, one gets it and the other moves on.
      fs.writeFileSync(join(dir, String(b)), JSON.stringify({ runDir: me, pid: process.pid }), { flag: 'wx', mode: 0o600 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      if (explicit) throw new IsolationError('UID_RANGE_TAKEN', `uids ${b}.. are being claimed by another host up; try again`);
      continue;
    }
    return b;
  }
  throw new IsolationError('UID_RANGE_TAKEN', `no free range of ${UID_RANGE} uids from ${base} on`);
}

/** Give the range back (host down); only the claim this run dir holds. */
export function releaseUidRange(runDir: string, base: number): void {
  const file = join(claimDir(), String(base));
  try {
    const c = JSON.parse(fs.readFileSync(file, 'utf8')) as { runDir?: unknown };
    if (c.runDir === resolve(runDir)) fs.rmSync(file, { force: true });
  } catch {
    // no claim (isolation none, or already released)
  }
}
