// The benchmarks document is rendered from bench-results/: tables between markers, prose kept.
import { afterAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { BenchDocError, parseReport, render } from '../../scripts/bench-doc.js';
import type { BenchReport } from '../../scripts/bench/lib.js';
import { dist, ROOT } from '../helpers/child.js';
import { scratchDir } from '../helpers/temp.js';

const run = promisify(execFile);
const scratch = scratchDir('bench-doc');
afterAll(scratch.cleanup);

const report: BenchReport = {
  bench: 'ring',
  date: '2026-12-07T09:50:00.000Z',
  machine: { cpus: 2, model: 'Intel(R) Xeon(R) Processor', node: 'v20.20.2', memGiB: 24, kernel: '6.18.44-fc-v1300' },
  conditions: { psiStart: 3.2, psiEnd: 4.8, loadStart: 0.7, loadEnd: 1.1 },
  figures: [
    { id: 'rtt_p50', unit: 'µs', ours: 3.1, peer: 9.3, ratio: 0.3333, note: 'UNIX-socket echo', target: { on: 'ratio', op: '<=', value: 0.5 } },
    { id: 'rtt_p99', unit: 'µs', ours: 40.2, peer: 23.1, ratio: 1.7403 },
    { id: 'throughput_32', unit: 'req/s', ours: 500000, peer: 300000, ratio: 1.6667, target: { on: 'ratio', op: '>=', value: 2 } },
  ],
};

const doc = [
  '# Benchmarks',
  '',
  'Hand-written intro.',
  '<!-- bench-doc:headline -->',
  'stale headline',
  '<!-- /bench-doc:headline -->',
  '',
  '## ring',
  'Why the ring polls.',
  '<!-- bench-doc:ring -->',
  '<!-- /bench-doc:ring -->',
  '## suspend',
  '<!-- bench-doc:suspend -->',
  'old table',
  '<!-- /bench-doc:suspend -->',
  'Trailing prose.',
  '',
].join('\n');

describe('bench-doc', () => {
  it('renders the headline (figures with a target, met or missed) and each bench table between its markers, keeping the prose', () => {
    const out = render(doc, [report]);
    const lines = out.split('\n');
    expect(lines.slice(0, 3)).toEqual(['# Benchmarks', '', 'Hand-written intro.']);
    expect(out).toContain('Why the ring polls.\n<!-- bench-doc:ring -->');
    expect(out.endsWith('<!-- /bench-doc:suspend -->\nTrailing prose.\n')).toBe(true);
    expect(out).not.toContain('stale headline');
    expect(out).not.toContain('old table');
    expect(out).toContain(
      '| ring | rtt_p50 | µs | 3.100 | 9.300 | 0.333 | ratio ≤ 0.5 | met | UNIX-socket echo | 2× Intel Xeon, 24 GiB, Linux 6.18.44, Node v20.20.2; quiet | 2026-12-07 09:50 UTC |',
    );
    expect(out).toContain('| ring | throughput_32 | req/s | 500000 | 300000 | 1.667 | ratio ≥ 2 | missed |');
    // A figure without a target stays out of the headline but is in the ring table.
    const headline = out.slice(out.indexOf('<!-- bench-doc:headline -->'), out.indexOf('<!-- /bench-doc:headline -->'));
    expect(headline).not.toContain('rtt_p99');
    expect(out).toContain('| rtt_p99 | µs | 40.2 | 23.1 | 1.740 |  |  |');
    expect(out).toContain('`npm run bench -- ring`, 2026-12-07 09:50 UTC: 2× Intel Xeon, 24 GiB, Linux 6.18.44, Node v20.20.2; quiet machine (CPU pressure 3 % → 5 %, load 0.7 → 1.1).');
    expect(out).toContain('_No results in bench-results/suspend.json yet: run `npm run bench -- suspend`._');
    // Rendering what it rendered changes nothing.
    expect(render(out, [report])).toBe(out);
  });

  it('says a run on a loaded machine was one', () => {
    const out = render(doc, [{ ...report, conditions: { psiStart: 82, psiEnd: 95, loadStart: 9, loadEnd: 9.1 } }]);
    expect(out).toContain('loaded machine (CPU pressure 82 % → 95 %, load 9 → 9.1)');
    expect(out).toContain('Node v20.20.2; loaded | 2026-12-07 09:50 UTC |');
  });

  it('refuses a malformed report naming the file and the field, and a document without its markers', () => {
    const bad = JSON.stringify({ ...report, figures: [{ id: 'x', unit: 'ms', ours: 'fast', peer: 1, ratio: 1 }] });
    expect(() => parseReport(bad, 'bench-results/ring.json')).toThrow(
      new BenchDocError('EBADREPORT', 'bench-results/ring.json: figures[0] (x).ours is not a number'),
    );
    expect(() => parseReport('{"bench": "ring",', 'r.json')).toThrow(/^EBADREPORT: r\.json: not JSON/);
    expect(() => render('# no markers\n', [report], 'docs/x.md')).toThrow(
      new BenchDocError('ENOMARKER', 'docs/x.md has no <!-- bench-doc:headline --> … <!-- /bench-doc:headline --> block'),
    );
  });

  it('`bench doc --check` fails on a stale document and passes once rendered', async () => {
    const results = join(scratch.dir, 'results');
    mkdirSync(results);
    writeFileSync(join(results, 'ring.json'), JSON.stringify(report));
    const file = join(scratch.dir, 'benchmarks.md');
    writeFileSync(file, doc);
    const bench = (...a: string[]) => run(process.execPath, [dist('scripts/bench.js'), 'doc', '--results', results, '--doc', file, ...a], { cwd: ROOT });
    await expect(bench('--check')).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining('is not what bench-results/ renders') });
    await bench();
    expect(readFileSync(file, 'utf8')).toBe(render(doc, [report]));
    await bench('--check');
  });

  it('the committed docs/benchmarks.md is what the committed bench-results/ render', () => {
    const text = readFileSync(join(ROOT, 'docs', 'benchmarks.md'), 'utf8');
    // loadReports reads every JSON in the directory, as the generator does.
    return import('../../scripts/bench-doc.js').then(({ loadReports }) => {
      expect(render(text, loadReports(join(ROOT, 'bench-results')))).toBe(text);
    });
  });
});
