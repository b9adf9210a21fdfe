// The command stream one stress guest runs (vtpm stress), and its journal. Command number `seq` is a
// pure function of (seed, domid, seq) and earlier answers, so a guest process that was killed or
// suspended continues exactly where it stopped. Before a command is submitted its id goes into the
// journal ("sent"); its answer goes in when it arrives ("ack"). A command the journal shows sent and
// not acknowledged is resubmitted under the same id, so the backend answers it once.
import fs from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import * as tpm2 from '../tpm/tpm2-commands.js';
import { Marshal, TPM2_ST_NO_SESSIONS, command as tpmCommand, responseCode } from '../tpm/wire.js';
import type { GuestSession } from '../frontend/session.js';

export const STRESS_PCR = 16;
export const STRESS_NV_INDEX = 0x01500016;
export const STRESS_NV_SIZE = 32;
const TPM_CC_FlushContext = 0x165;
const TPM_RC_NV_DEFINED = 0x14c;

export interface WorkloadSpec {
  seed: number;
  commands: number;
  /** Where dom<N>.jsonl journals go. */
  journalDir: string;
  /** A suspend/resume about every K commands of each guest (0 or absent: none); see suspendPoints. */
  suspendEvery?: number;
}

export type Op = 'startup' | 'define' | 'extend' | 'random' | 'nvwrite' | 'create' | 'flush' | 'pcrread' | 'nvread';

export interface JournalLine {
  /**
   * suspend: the guest reached suspend point `s` and asks the toolstack (the harness) for a suspend;
   * suspended: that suspend came (written as the guest suspends).
   */
  t: 'sent' | 'ack' | 'done' | 'suspend' | 'suspended';
  s: number;
  id?: string;
  op?: Op;
  /** extend digest / NV data (hex), for the harness's model. */
  d?: string;
  rc?: number;
  /** response bytes (hex) where the harness or the next command needs them. */
  r?: string;
  /** wall clock (ms since epoch) at send / ack. */
  at?: number;
  ms?: number;
}

export function journalPath(spec: WorkloadSpec, domid: number): string {
  return join(spec.journalDir, `dom${domid}.jsonl`);
}

function h(seed: number, domid: number, seq: number, what: string): Buffer {
  return createHash('sha256').update(`${seed}/${domid}/${seq}/${what}`).digest();
}

/** Total commands of a guest's stream: setup (2), the random ones, final reads (2). */
export function streamLength(spec: WorkloadSpec): number {
  return spec.commands + 4;
}

/**
 * Where a guest asks to be suspended: point j lies in (jK - K/2, jK], drawn from (seed, domid, j), so
 * consecutive points are K/2..3K/2 commands apart; only among the stream's random commands (not the
 * setup or the final reads). The harness's "asked" count is the number of these points.
 */
export function suspendPoints(spec: WorkloadSpec, domid: number): number[] {
  const k = spec.suspendEvery ?? 0;
  if (k <= 0) return [];
  const out: number[] = [];
  for (let j = 1; ; j++) {
    const p = j * k - Math.floor((h(spec.seed, domid, j, 'suspend')[0]! / 256) * Math.floor(k / 2));
    if (p >= streamLength(spec) - 2) return out;
    if (p >= 2) out.push(p);
  }
}

/** Commands a guest may still send after asking for a suspend before it holds still for it. */
export const suspendSlack = (spec: WorkloadSpec): number => Math.max(1, Math.floor((spec.suspendEvery ?? 0) / 4));

/** Command `seq` of the stream; `prev` is the answer to seq-1 (a flush needs the handle it created). */
export function commandAt(spec: WorkloadSpec, domid: number, seq: number, prevOp: Op | undefined, prevRsp: Uint8Array | undefined): { op: Op; cmd: Uint8Array; d?: Buffer } {
  const n = streamLength(spec);
  if (seq === 0) return { op: 'startup', cmd: tpm2.startup(tpm2.TPM_SU_CLEAR) };
  if (seq === 1) return { op: 'define', cmd: tpm2.nvDefineSpace(STRESS_NV_INDEX, STRESS_NV_SIZE) };
  if (seq === n - 2) return { op: 'pcrread', cmd: tpm2.pcrReadSha256(STRESS_PCR) };
  if (seq === n - 1) return { op: 'nvread', cmd: tpm2.nvRead(STRESS_NV_INDEX, STRESS_NV_SIZE) };
  if (prevOp === 'create' && prevRsp && responseCode(prevRsp) === 0) {
    const handle = tpm2.parseCreatePrimaryHandle(prevRsp);
    return { op: 'flush', cmd: tpmCommand(TPM2_ST_NO_SESSIONS, TPM_CC_FlushContext, new Marshal().u32(handle)) };
  }
  const r = h(spec.seed, domid, seq, 'op')[0]! / 256;
  if (r < 0.45) {
    const d = h(spec.seed, domid, seq, 'digest');
    return { op: 'extend', cmd: tpm2.pcrExtendSha256(STRESS_PCR, d), d };
  }
  if (r < 0.65) return { op: 'random', cmd: tpm2.getRandom(16) };
  if (r < 0.92 || seq >= n - 3) {
    const d = h(spec.seed, domid, seq, 'nv');
    return { op: 'nvwrite', cmd: tpm2.nvWrite(STRESS_NV_INDEX, d), d };
  }
  // A primary key per guest: libtpms derives it from the template, so it is a real creation once and a
  // cheap re-derivation after; the handle it loads must survive suspend until the flush that follows.
  return { op: 'create', cmd: tpm2.createPrimaryRsa(2048, h(spec.seed, domid, 0, 'unique').subarray(0, 16)) };
}

export function readJournal(file: string): JournalLine[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: JournalLine[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    try {
      out.push(JSON.parse(line) as JournalLine);
    } catch {
      // A guest killed mid-append leaves a torn last line: that record never happened.
    }
  }
  return out;
}

/** Run (or continue) this guest's stream on the session; stop() pauses it for a suspend. */
export function startWorkload(session: GuestSession, specFile: string, domid: number, log: (l: string) => void): { stop(opts?: { suspended?: boolean }): Promise<void> } {
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8')) as WorkloadSpec;
  const file = journalPath(spec, domid);
  fs.mkdirSync(spec.journalDir, { recursive: true });
  const lines = readJournal(file);
  const acked = new Map<number, JournalLine>();
  const sent = new Map<number, JournalLine>();
  const asked = new Set<number>();
  const served = new Set<number>();
  for (const l of lines) {
    if (l.t === 'ack') acked.set(l.s, l);
    if (l.t === 'sent') sent.set(l.s, l);
    if (l.t === 'suspend') asked.add(l.s);
    if (l.t === 'suspended') served.add(l.s);
  }
  const points = new Set(suspendPoints(spec, domid));
  /** After asking for a suspend the guest sends a few more commands (so some are in flight when it comes), then holds. */
  let holdAt: number | null = null;
  /** The suspend point asked for last and not served yet. */
  let asking: number | null = null;
  // Killed while waiting for a suspend it had asked for: it still waits for it.
  for (const p of asked) if (!served.has(p)) asking = p;
  let released: () => void = () => {};
  const stopped = new Promise<void>((r) => (released = r));
  const fd = fs.openSync(file, 'a');
  // Make sure the next line starts on its own (the previous process may have died mid-line).
  if (lines.length && !fs.readFileSync(file, 'utf8').endsWith('\n')) fs.writeSync(fd, '\n');
  const append = (l: JournalLine): void => void fs.writeSync(fd, JSON.stringify(l) + '\n');
  let stopping = false;
  const total = streamLength(spec);
  const run = (async () => {
    let seq = 0;
    while (acked.has(seq)) seq++;
    if (asking !== null) holdAt = seq;
    for (; seq < total && !stopping; seq++) {
      if (holdAt !== null && seq >= holdAt) {
        // The toolstack has not suspended us yet: issue nothing more until it does (stop() ends this).
        await stopped;
        break;
      }
      if (points.has(seq) && !asked.has(seq)) {
        append({ t: 'suspend', s: seq, at: Date.now() });
        asked.add(seq);
        asking = seq;
        // At the latest before the final reads, so the stream cannot end with the suspend still owed.
        holdAt = Math.min(seq + suspendSlack(spec), total - 2);
      }
      const prev = acked.get(seq - 1);
      const { op, cmd, d } = commandAt(spec, domid, seq, prev?.op, prev?.r ? Buffer.from(prev.r, 'hex') : undefined);
      const earlier = sent.get(seq);
      const t0 = Date.now();
      const p0 = performance.now();
      let rsp: Uint8Array;
      let id: bigint;
      if (earlier?.id !== undefined) {
        // Sent by a previous process and never answered to us: same id, same bytes.
        id = BigInt(earlier.id);
        rsp = await session.resubmit({ id, command: cmd, locality: 0 });
      } else {
        id = session.nextId;
        append({ t: 'sent', s: seq, id: String(id), op, ...(d ? { d: d.toString('hex') } : {}), at: t0 });
        rsp = await session.submit(cmd);
      }
      const rc = responseCode(rsp);
      const keep = op === 'create' || op === 'pcrread' || op === 'nvread';
      const line: JournalLine = { t: 'ack', s: seq, id: String(id), op, rc, at: Date.now(), ms: performance.now() - p0, ...(keep ? { r: Buffer.from(rsp).toString('hex') } : {}) };
      append(line);
      acked.set(seq, line);
      if (op === 'define' && rc !== 0 && rc !== TPM_RC_NV_DEFINED) log(`dom${domid}: NV_DefineSpace answered 0x${rc.toString(16)}`);
    }
    if (!stopping) {
      append({ t: 'done', s: total });
      log(`dom${domid}: workload done (${total} commands)`);
    }
  })();
  run.catch((e: unknown) => {
    if (!stopping) log(`dom${domid}: workload failed: ${(e as Error).message}`);
  });
  return {
    async stop(opts: { suspended?: boolean } = {}) {
      stopping = true;
      // The suspend this guest asked for has come (the journal says so before the guest is gone).
      if (opts.suspended && asking !== null) append({ t: 'suspended', s: asking, at: Date.now() });
      asking = null;
      released();
      await run.catch(() => {});
    },
  };
}
