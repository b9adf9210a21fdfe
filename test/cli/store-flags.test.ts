// `--store etcd://…` and its companions on `vtpm host up` and `vtpm manager`: a command line that
// cannot work exits 2 naming the flag before anything starts; a master key file that is missing or
// readable by others, or an etcd nobody answers on, exits 1 naming the file or the endpoints.
import { afterAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { vtpm } from './cli.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const work = tempDir('cli-store');
const run = join(work, 'run');
const state = join(work, 'state');
afterAll(() => removeDir(work));

describe('store flags', () => {
  it('refuse a command line that cannot work (exit 2), before starting anything', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['--store', 'http://127.0.0.1:2379', '--master-key', 'k'], /store "http:\/\/127.0.0.1:2379" is not etcd:\/\/HOST:PORT/],
      [['--store', 'etcd://127.0.0.1:99999', '--master-key', 'k'], /"127.0.0.1:99999" is not HOST:PORT/],
      [['--store', 'etcd://127.0.0.1:2379'], /--store needs --master-key FILE/],
      [['--master-key', 'k'], /--master-key belongs with --store etcd:\/\//],
      [['--store', 'etcd://127.0.0.1:2379', '--master-key', 'k', '--lease-ttl', '1'], /--lease-ttl takes whole seconds from 2 to 3600, not 1/],
      [['--store', 'etcd://127.0.0.1:2379', '--master-key', 'k', '--etcd-cert', 'c'], /--etcd-cert and --etcd-key need --etcd-ca/],
    ];
    for (const [flags, why] of cases) {
      const r = await vtpm('host', 'up', '--run', run, '--state', state, ...flags);
      expect(r.code, flags.join(' ')).toBe(2);
      expect(r.stderr).toMatch(why);
      expect(fs.existsSync(join(run, 'host.json'))).toBe(false);
    }
  });

  it('the manager refuses a missing or group-readable key file and an etcd that does not answer (exit 1)', async () => {
    const key = join(work, 'master.key');
    const m = (...f: string[]) => vtpm('manager', '--state', state, '--run', join(work, 'mrun'), '--store', 'etcd://127.0.0.1:1', ...f);
    let r = await m('--master-key', key);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${key}: no such master key file`);
    fs.writeFileSync(key, randomBytes(32), { mode: 0o644 });
    fs.chmodSync(key, 0o644);
    r = await m('--master-key', key);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/has mode 644; it must be 0600/);
    fs.chmodSync(key, 0o600);
    r = await m('--master-key', key);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/connecting to etcd:\/\/127.0.0.1:1: etcd did not answer/);
  }, 60_000);
});
