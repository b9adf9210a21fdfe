// `npm run bench -- NAME [--json FILE] [bench args…]`: runs scripts/bench/NAME, prints the table and
// writes the JSON report (default bench-results/NAME.json). Every bench measures its peer in the same
// run, so the ratio compares like with like on this machine today. `npm run bench -- doc` renders
// bench-results/ into docs/benchmarks.md (scripts/bench-doc.ts).
import { mkdirSync, writeFileSync, readdirSync } from 'node:fs';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpuPressure, machine, round, settle, table, type BenchModule, type BenchReport } from './bench/lib.js';
import { main as benchDoc } from './bench-doc.js';

const here = dirname(fileURLToPath(import.meta.url));

async function main(argv: string[]): Promise<number> {
  const available = readdirSync(join(here, 'bench'))
    .filter((f) => f.endsWith('.js') && f !== 'lib.js' && !f.startsWith('_'))
    .map((f) => f.slice(0, -3));
  const name = argv[0];
  if (name === 'doc') return benchDoc(argv.slice(1));
  if (!name || name.startsWith('-')) {
    console.error(`usage: npm run bench -- NAME [--json FILE] [args]\nbenches: ${available.join(', ')}`);
    return 2;
  }
  if (!available.includes(name)) {
    console.error(`unknown bench "${name}"; benches: ${available.join(', ')}`);
    return 2;
  }
  const rest = argv.slice(1);
  let jsonPath = join(process.cwd(), 'bench-results', `${name}.json`);
  const args: string[] = [];
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--json') {
      const v = rest[++i];
      if (!v) throw new Error('--json needs a file name');
      jsonPath = v;
    } else args.push(rest[i]!);
  }
  const mod = (await import(`./bench/${name}.js`)) as BenchModule;
  // The previous bench's (or build's) pressure lingers in the kernel's 10-second average: let it pass,
  // so psiStart says what other work shares the machine, not what we just did.
  const log = (l: string): void => console.error(`[${name}] ${l}`);
  await settle({ args, log });
  const psiStart = cpuPressure();
  const loadStart = os.loadavg()[0]!;
  const figures = await mod.run({ args, log });
  const report: BenchReport = {
    bench: name,
    date: new Date().toISOString(),
    machine: machine(),
    conditions: { psiStart, psiEnd: cpuPressure(), loadStart: round(loadStart, 2), loadEnd: round(os.loadavg()[0]!, 2) },
    figures: figures.map((f) => ({
      id: f.id,
      unit: f.unit,
      ours: round(f.ours),
      peer: round(f.peer),
      ratio: round(f.ours / f.peer, 4),
      ...(f.note ? { note: f.note } : {}),
      ...(f.target ? { target: f.target } : {}),
    })),
  };
  mkdirSync(dirname(jsonPath), { recursive: true });
  writeFileSync(jsonPath, JSON.stringify(report, null, 2) + '\n');
  console.log(table(report));
  console.log(`\nwrote ${jsonPath}`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : String(err));
    process.exit(1);
  },
);
