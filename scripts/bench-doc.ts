// `npm run bench -- doc [--check] [--results DIR] [--doc FILE]`: renders bench-results/*.json (what
// `npm run bench -- NAME` writes) into docs/benchmarks.md between marker comments, so the figures in
// the docs are the figures of a run, with its machine, date and how busy the machine was. The prose
// around the markers is hand-written and kept. `--check` changes nothing and fails if the file is stale.
//
// Markers: <!-- bench-doc:headline --> … <!-- /bench-doc:headline --> (every figure that has a target,
// across benches) and <!-- bench-doc:NAME --> … <!-- /bench-doc:NAME --> (all figures of bench NAME).
import fs from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fmt, type BenchReport, type Target } from './bench/lib.js';

/** The order benches appear in the headline table; others follow by name. */
const ORDER = ['ring', 'e2e', 'engine', 'manager', 'store', 'xenstore', 'qemu', 'suspend', 'multivm'];
/** Above this CPU pressure (PSI some avg10, %) a run counts as taken on a loaded machine (src/xen/poll.ts stands down there too). */
const QUIET_PSI = 10;

export class BenchDocError extends Error {
  constructor(
    readonly code: 'EBADREPORT' | 'ENOMARKER',
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'BenchDocError';
  }
}

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);

/** Parse and check one report; every complaint names the file and the field. */
export function parseReport(text: string, file: string): BenchReport {
  let r: unknown;
  try {
    r = JSON.parse(text);
  } catch (err) {
    throw new BenchDocError('EBADREPORT', `${file}: not JSON (${(err as Error).message})`);
  }
  const bad = (what: string): never => {
    throw new BenchDocError('EBADREPORT', `${file}: ${what}`);
  };
  if (!isObj(r)) return bad('not an object');
  if (typeof r.bench !== 'string' || !/^[a-z0-9-]+$/.test(r.bench)) bad('"bench" must be a bench name');
  if (typeof r.date !== 'string' || Number.isNaN(Date.parse(r.date))) bad('"date" must be an ISO date');
  if (!isObj(r.machine) || typeof r.machine.model !== 'string' || typeof r.machine.cpus !== 'number') bad('"machine" lacks cpus/model');
  if (!Array.isArray(r.figures)) return bad('"figures" must be an array');
  r.figures.forEach((f: unknown, i: number) => {
    if (!isObj(f)) return bad(`figures[${i}] is not an object`);
    if (typeof f.id !== 'string' || typeof f.unit !== 'string') bad(`figures[${i}] lacks id/unit`);
    for (const k of ['ours', 'peer', 'ratio'] as const) {
      // JSON has no NaN: a figure that could not be measured is written as null.
      if (typeof f[k] !== 'number' && f[k] !== null) bad(`figures[${i}] (${String(f.id)}).${k} is not a number`);
    }
    const t = f.target;
    if (t !== undefined && (!isObj(t) || (t.on !== 'ratio' && t.on !== 'ours') || (t.op !== '<=' && t.op !== '>=') || typeof t.value !== 'number')) {
      bad(`figures[${i}] (${String(f.id)}).target must be {on: ratio|ours, op: <=|>=, value}`);
    }
  });
  return r as unknown as BenchReport;
}

export function loadReports(dir: string): BenchReport[] {
  if (!fs.existsSync(dir)) return [];
  const rank = (b: string): number => (ORDER.includes(b) ? ORDER.indexOf(b) : ORDER.length);
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .map((f) => parseReport(fs.readFileSync(join(dir, f), 'utf8'), join(dir, f)))
    .sort((a, b) => rank(a.bench) - rank(b.bench) || a.bench.localeCompare(b.bench));
}

const num = (x: number | null): string => (x === null ? '–' : fmt(x));

export function targetText(t: Target): string {
  return `${t.on} ${t.op === '<=' ? '≤' : '≥'} ${t.value}`;
}

/** Whether a figure meets its target ("met"/"missed"), or "–" without one or without a value. */
export function verdict(f: BenchReport['figures'][number]): string {
  const t = f.target;
  if (!t) return '';
  const v = t.on === 'ratio' ? f.ratio : f.ours;
  if (typeof v !== 'number' || !Number.isFinite(v)) return '–';
  return (t.op === '<=' ? v <= t.value : v >= t.value) ? 'met' : 'missed';
}

function machineShort(r: BenchReport): string {
  const m = r.machine;
  const model = m.model.replace(/\(R\)|\(TM\)|CPU|Processor|\s+@.*$/g, '').replace(/\s+/g, ' ').trim();
  return `${m.cpus}× ${model}, ${m.memGiB} GiB, Linux ${m.kernel.replace(/-.*$/, '')}, Node ${m.node}`;
}

/**
 * 'quiet', 'loaded' or 'load unknown', from the pressure when the bench started (after settling): the
 * pressure at its end is the bench's own processes and says nothing about other work on the machine.
 */
function busyness(r: BenchReport): string {
  const start = r.conditions?.psiStart ?? null;
  if (start === null) return 'load unknown';
  return start <= QUIET_PSI ? 'quiet' : 'loaded';
}

/** One line on how busy the machine was during the run. */
function conditionsText(r: BenchReport): string {
  const c = r.conditions;
  if (!c) return 'machine load not recorded';
  const psi = [c.psiStart, c.psiEnd].filter((x): x is number => x !== null);
  const psiText = psi.length ? `CPU pressure ${psi.map((x) => `${x.toFixed(0)} %`).join(' → ')}` : 'no PSI';
  return `${busyness(r)} machine (${psiText}, load ${c.loadStart} → ${c.loadEnd})`;
}

const day = (iso: string): string => iso.slice(0, 16).replace('T', ' ') + ' UTC';

function mdTable(header: string[], rows: string[][]): string {
  const esc = (c: string): string => c.replace(/\|/g, '\\|');
  return [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.map(esc).join(' | ')} |`)].join('\n');
}

/** Every figure with a target, from every bench: the table a reader looks at first. */
export function headlineTable(reports: BenchReport[]): string {
  const rows: string[][] = [];
  for (const r of reports) {
    for (const f of r.figures) {
      if (!f.target) continue;
      rows.push([r.bench, f.id, f.unit, num(f.ours), num(f.peer), num(f.ratio), targetText(f.target), verdict(f), f.note ?? '', `${machineShort(r)}; ${busyness(r)}`, day(r.date)]);
    }
  }
  if (rows.length === 0) return '_No figure with a target in bench-results/ yet._';
  return mdTable(['bench', 'figure', 'unit', 'ours', 'peer', 'ratio', 'target', '', 'peer is', 'machine', 'date'], rows);
}

/** All figures of one bench, with the run's machine, date and load above them. */
export function benchTable(r: BenchReport): string {
  const head = `\`npm run bench -- ${r.bench}\`, ${day(r.date)}: ${machineShort(r)}; ${conditionsText(r)}.`;
  const rows = r.figures.map((f) => [f.id, f.unit, num(f.ours), num(f.peer), num(f.ratio), f.target ? `${targetText(f.target)} (${verdict(f)})` : '', f.note ?? '']);
  return `${head}\n\n${mdTable(['figure', 'unit', 'ours', 'peer', 'ratio', 'target', 'peer is'], rows)}`;
}

const GENERATED = '<!-- generated by `npm run bench -- doc` from bench-results/: edit the JSON or the generator, not this block -->';

function replaceBlock(doc: string, name: string, body: string, file: string): string {
  const open = `<!-- bench-doc:${name} -->`;
  const close = `<!-- /bench-doc:${name} -->`;
  const a = doc.indexOf(open);
  const b = doc.indexOf(close);
  if (a < 0 || b < a) throw new BenchDocError('ENOMARKER', `${file} has no ${open} … ${close} block`);
  return `${doc.slice(0, a + open.length)}\n${GENERATED}\n\n${body}\n${doc.slice(b)}`;
}

/** The document with every marked block re-rendered; text outside the blocks is kept byte for byte. */
export function render(doc: string, reports: BenchReport[], file = 'docs/benchmarks.md'): string {
  let out = replaceBlock(doc, 'headline', headlineTable(reports), file);
  const names = new Set([...reports.map((r) => r.bench), ...[...doc.matchAll(/<!-- bench-doc:([a-z0-9-]+) -->/g)].map((m) => m[1]!)]);
  names.delete('headline');
  for (const name of names) {
    const r = reports.find((x) => x.bench === name);
    const body = r ? benchTable(r) : `_No results in bench-results/${name}.json yet: run \`npm run bench -- ${name}\`._`;
    out = replaceBlock(out, name, body, file);
  }
  return out;
}

export function main(argv: string[]): number {
  const opt = (name: string, def: string): string => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
  };
  const resultsDir = opt('results', join(process.cwd(), 'bench-results'));
  const docFile = opt('doc', join(process.cwd(), 'docs', 'benchmarks.md'));
  const before = fs.readFileSync(docFile, 'utf8');
  const after = render(before, loadReports(resultsDir), docFile);
  if (argv.includes('--check')) {
    if (after !== before) {
      console.error(`${docFile} is not what bench-results/ renders: run \`npm run bench -- doc\``);
      return 1;
    }
    return 0;
  }
  if (after !== before) fs.writeFileSync(docFile, after);
  console.log(`${docFile}: ${after === before ? 'up to date' : 'rendered'} from ${resultsDir}`);
  return 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  try {
    process.exitCode = main(process.argv.slice(2));
  } catch (err) {
    console.error(err instanceof Error ? err.message : String(err));
    process.exitCode = 1;
  }
}
