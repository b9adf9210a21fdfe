// The daemons' log sink: text stays exactly what it was; `--log-format json` writes one pino object per
// line with daemon, event, domid, vm and instance, the guest's strings escaped as in text.
import { expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { LogFormatError, fieldsOf, parseLogFormat } from '../../src/util/log.js';

const run = promisify(execFile);

/** What makeLog writes for `lines` in a child process (the sink writes to fd 1 or 2 synchronously). */
async function sink(format: string, lines: string[]): Promise<string> {
  const code = `
    import { makeLog } from '${new URL('../../dist/src/util/log.js', import.meta.url).pathname}';
    const log = makeLog('backend', '${format}', 'stdout', (l) => 'T ' + l + '\\n');
    for (const l of ${JSON.stringify(lines)}) log(l);`;
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', code]);
  return stdout;
}

const VM = '6f1b0d52-6c1e-4b8e-9a57-3f0c2f7d9a01';

it('text: the line as before, escaped', async () => {
  expect(await sink('text', [`dom5: connected (ring), vTPM instance 3 of VM ${VM}`, 'dom5: cut off: ring-ref "a\nforged line\u2028"'])).toBe(
    `T dom5: connected (ring), vTPM instance 3 of VM ${VM}\nT dom5: cut off: ring-ref "a\\nforged line\\u2028"\n`,
  );
});

it('json: one object per line with daemon, event, domid, vm, instance; guest strings escaped before JSON', async () => {
  const out = await sink('json', [`dom5: connected (ring), vTPM instance 3 of VM ${VM}`, 'dom7: cut off: ring-ref "\u001b[31mred\u2028"']);
  const lines = out.trimEnd().split('\n');
  expect(lines).toHaveLength(2);
  const [a, b] = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
  expect(a).toMatchObject({ level: 30, daemon: 'backend', event: 'connected', domid: 5, vm: VM, instance: 3, msg: `dom5: connected (ring), vTPM instance 3 of VM ${VM}` });
  expect(typeof a!.time).toBe('string');
  expect(b).toMatchObject({ event: 'cut_off', domid: 7, msg: 'dom7: cut off: ring-ref "\\x1b[31mred\\u2028"' });
  // Nothing a terminal or a line splitter would act on survives in the raw line either.
  expect(lines[1]).not.toMatch(/[\u0000-\u001f\u2028\u2029]/);
});

it('reads the fields a line names, and names its event from what it says', () => {
  expect(fieldsOf('client c1 (pid 4): LOADNVM on instance 9: unknown instance 9; answered TPM_BAD_PARAMETER')).toEqual({ instance: 9, event: 'request_refused' });
  expect(fieldsOf(`dom12: suspended, vTPM instance 2 saved`)).toEqual({ domid: 12, instance: 2, event: 'suspended' });
  expect(fieldsOf('vtpm-backend: ready')).toEqual({ event: 'ready' });
  expect(fieldsOf('something else')).toEqual({ event: 'message' });
});

it('--log-format takes text or json only', () => {
  expect(parseLogFormat(undefined)).toBe('text');
  expect(parseLogFormat('json')).toBe('json');
  expect(() => parseLogFormat('xml')).toThrow(LogFormatError);
  expect(() => parseLogFormat('xml')).toThrow('--log-format takes text or json, not "xml"');
});
