import { afterEach, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { ManagerClient } from '../../src/manager/client.js';
import { startManager, type RunningManager } from './helpers.js';
import { tempDir } from '../helpers/temp.js';

const INSTANCES = 50;
const CLIENTS = 8;
const SAVES = 1000;

let running: RunningManager | null = null;
let clients: ManagerClient[] = [];
afterEach(async () => {
  for (const c of clients) c.disconnect();
  clients = [];
  await running?.stop('SIGKILL');
  running = null;
});

/** A blob that names its instance and sequence number; the rest is random. */
function blob(instance: number, seq: number): Buffer {
  const b = crypto.randomBytes(4096);
  b.writeUInt32BE(instance, 0);
  b.writeUInt32BE(seq, 4);
  return b;
}

describe('crash safety: kill -9 of the manager during 1000 concurrent saves', () => {
  it('after every restart each acknowledged save (or a later one) loads intact, never a torn one', async () => {
    const stateDir = tempDir('crash-state');
    const runDir = tempDir('crash-run');
    const uuid = (i: number): string => `c0000000-0000-4000-8000-${i.toString(16).padStart(12, '0')}`;
    const issued = new Map<string, Buffer>(); // "instance/seq" → blob
    const acked = new Map<number, number>(); // instance → highest acknowledged seq
    const instanceOf = new Map<number, number>(); // vm index → instance
    let seq = 0;
    const ROUNDS = 10;
    let fullRunMs = 0;
    let mixedRounds = 0; // rounds where the kill landed with some saves acknowledged and some not

    for (let round = 0; round <= ROUNDS; round++) {
      running = await startManager(stateDir, runDir);
      clients = await Promise.all(Array.from({ length: CLIENTS }, () => ManagerClient.connect(runDir)));

      // Everything acknowledged before the last kill must be there, byte for byte.
      for (let v = 1; v <= INSTANCES; v++) {
        const { instance, created } = await clients[0]!.open({ vmUuid: uuid(v), version: '2.0' });
        if (round === 0) instanceOf.set(v, instance);
        else {
          expect(created).toBe(false);
          expect(instance).toBe(instanceOf.get(v));
        }
        const got = await clients[v % CLIENTS]!.load(instance, 'permanent');
        const want = acked.get(instance);
        if (want === undefined) continue;
        expect(got, `instance ${instance} lost its state`).not.toBeNull();
        const g = Buffer.from(got!);
        expect(g.readUInt32BE(0)).toBe(instance);
        const s = g.readUInt32BE(4);
        expect(s, `instance ${instance} went back from acknowledged seq ${want}`).toBeGreaterThanOrEqual(want);
        expect(g.equals(issued.get(`${instance}/${s}`)!), `instance ${instance} seq ${s} is not what was saved`).toBe(true);
      }
      if (round === ROUNDS) break;

      // 1000 saves at once; one client per instance keeps each instance's saves in issue order.
      // Round 0 runs to the end and times the batch. Then the kill lands either right after a random
      // number of acknowledgements (odd rounds: inside the commits, more saves queued behind them) or
      // after a random delay within the time the full batch took (even rounds: anywhere at all).
      const killAfter = round % 2 === 1 ? 1 + Math.floor(Math.random() * 300) : -1;
      const t0 = Date.now();
      let ok = 0;
      let failed = 0;
      const saves = Array.from({ length: SAVES }, (_, k) => {
        const instance = instanceOf.get((k % INSTANCES) + 1)!;
        const s = ++seq;
        const b = blob(instance, s);
        issued.set(`${instance}/${s}`, b);
        return clients[instance % CLIENTS]!.store(instance, 'permanent', b).then(
          () => {
            acked.set(instance, Math.max(acked.get(instance) ?? 0, s));
            if (++ok === killAfter && round > 0) running!.proc.kill('SIGKILL');
          },
          () => failed++,
        );
      });
      if (round === 0) {
        await Promise.all(saves);
        fullRunMs = Date.now() - t0;
        await running.stop('SIGTERM');
      } else {
        if (round % 2 === 0) {
          await new Promise((r) => setTimeout(r, Math.floor(Math.random() * fullRunMs * 0.6)));
          running.proc.kill('SIGKILL');
        }
        await Promise.all(saves);
        await running.stop();
      }
      if (ok > 0 && failed > 0) mixedRounds++;
      console.log(`round ${round}: ${ok} acknowledged, ${failed} cut off by the kill`);
      for (const c of clients) c.disconnect();
      clients = [];
      running = null;
    }
    expect(mixedRounds).toBeGreaterThanOrEqual(3);
    // Restarts cleaned every half-written file up.
    expect(fs.readdirSync(stateDir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });
});
