// The fuzz generators are reproducible from the run's seed: the same seed gives the same inputs on
// every machine, each target's stream is its own, and another seed gives other inputs.
import { describe, expect, it } from 'vitest';
import { Rng, ctrlMessage, managerFrame, targetSeed, tpmCommand, xsFrame } from '../../scripts/fuzz/gen.js';

function stream(seed: number, target: string): string {
  const r = new Rng(targetSeed(seed, target));
  const out: Buffer[] = [];
  for (let i = 0; i < 200; i++) {
    if (target === 'xs_wire') out.push(xsFrame(r, 300, [5]));
    else if (target === 'swtpm ctrl') out.push(ctrlMessage(r));
    else if (target === 'manager frames') out.push(managerFrame(r, 7));
    else out.push(tpmCommand(r, 4088));
  }
  return Buffer.concat(out).toString('hex');
}

describe('fuzz generators', () => {
  it('give the same inputs for the same seed, other inputs for another seed or target', () => {
    for (const t of ['xs_wire', 'swtpm ctrl', 'manager frames', 'v2 page']) {
      expect(stream(15, t)).toBe(stream(15, t));
      expect(stream(15, t)).not.toBe(stream(16, t));
    }
    expect(targetSeed(15, 'xs_wire')).not.toBe(targetSeed(15, 'swtpm ctrl'));
    // mulberry32 of seed 15, as on any machine
    expect(new Rng(15).u32()).toBe(1021515132);
  });

  it('frame xs_wire requests as the header says, except the announced violations', () => {
    const r = new Rng(targetSeed(15, 'xs_wire'));
    let violations = 0;
    for (let i = 0; i < 5000; i++) {
      const f = xsFrame(r, 300, []);
      const len = f.readUInt32LE(12);
      if (len > 4096) {
        violations++;
        expect(f.length).toBe(16);
      } else expect(f.length).toBe(16 + len);
    }
    expect(violations).toBeGreaterThan(10);
    expect(violations).toBeLessThan(150);
  });
});
