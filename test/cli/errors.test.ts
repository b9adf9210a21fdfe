// Every CLI error names what was wrong and what to do (issue 24 item 11): the manager's refusals
// (migrated out, replayed blob, unknown VM) with its own reason, a key file that is not a PEM public
// key, a run directory that is a host's rather than its manager's, a missing directory; and
// `migrate out` of a VM whose guest is attached is refused unless --force.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { join } from 'node:path';
import { ok, vtpm } from './cli.js';
import { tempDir, removeDir } from '../helpers/temp.js';

const work = tempDir('cli-errors');
const src = join(work, 'src');
const dst = join(work, 'dst');
const key = join(work, 'dst.pem');
const vm = randomUUID();

beforeAll(async () => {
  await ok('host', 'up', '--run', src, '--state', join(work, 'src-state'));
  await ok('host', 'up', '--run', dst, '--state', join(work, 'dst-state'));
  await ok('guest', 'attach', '--run', src, '--domid', '1', '--vm', vm);
});

afterAll(async () => {
  await vtpm('host', 'down', '--run', src);
  await vtpm('host', 'down', '--run', dst);
  removeDir(work);
});

describe('migrate', () => {
  it("key: takes a host's run directory for its manager's, and names a missing one", async () => {
    expect(await ok('migrate', 'key', '--run', dst, '--out', key)).toMatch(/^[0-9a-f]{64}\n$/);
    expect(fs.readFileSync(key, 'utf8')).toMatch(/^-----BEGIN PUBLIC KEY-----/);
    const missing = await vtpm('migrate', 'key', '--run', join(work, 'nope'), '--out', join(work, 'k.pem'));
    expect(missing.code).toBe(1);
    expect(missing.stderr).toBe(`vtpm: --run ${join(work, 'nope')} does not exist (give a host's run directory or its manager's)\n`);
    const noDir = await vtpm('migrate', 'key', '--run', dst, '--out', join(work, 'nodir', 'k.pem'));
    expect(noDir.stderr).toMatch(/the directory of --out .*nodir\/k\.pem \(.*nodir\) does not exist/);
  });

  it('out: a key file that is not PEM is named as such', async () => {
    const bad = join(work, 'bad.pem');
    fs.writeFileSync(bad, 'not a key\n');
    const r = await vtpm('migrate', 'out', '--run', src, '--vm', vm, '--to-key', bad, '--out', join(work, 'x.blob'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/is not a PEM public key .*`vtpm migrate key --out FILE`/);
    expect(r.stderr).not.toMatch(/DECODER|error:[0-9A-F]{8}/);
  });

  it('out: a VM whose guest is attached is refused unless detached, or sent with --force saying what follows', async () => {
    const r = await vtpm('migrate', 'out', '--run', src, '--vm', vm, '--to-key', key, '--out', join(work, 'vm.blob'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`VM ${vm} is attached to dom1: detach it first .*or --force`));
    expect(fs.existsSync(join(work, 'vm.blob'))).toBe(false);
    // --force on another attached VM: it goes, with the warning.
    const other = randomUUID();
    await ok('guest', 'attach', '--run', src, '--domid', '2', '--vm', other);
    const forced = await vtpm('migrate', 'out', '--run', src, '--vm', other, '--to-key', key, '--out', join(work, 'other.blob'), '--force');
    expect(forced.code).toBe(0);
    expect(forced.stderr).toMatch(/--force: dom2 stays attached; its vTPM can no longer save here/);
    await ok('guest', 'detach', '--run', src, '--domid', '2');
  });

  it('out of an unknown VM, a replayed blob and an attach of a migrated-out VM say what happened', async () => {
    const unknown = randomUUID();
    const u = await vtpm('migrate', 'out', '--run', src, '--vm', unknown, '--to-key', key, '--out', join(work, 'u.blob'));
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(new RegExp(`VM ${unknown} is unknown to this manager[^]*manager: MIGRATE_OUT of unknown vm ${unknown}`));
    expect(u.stderr).not.toMatch(/^vtpm: [A-Z_]+ on instance \d+: \w+$/m);

    await ok('guest', 'detach', '--run', src, '--domid', '1');
    const blob = join(work, 'vm.blob');
    await ok('migrate', 'out', '--run', src, '--vm', vm, '--to-key', key, '--out', blob);
    await ok('migrate', 'in', '--run', join(dst, 'manager'), '--blob', blob);
    const replay = await vtpm('migrate', 'in', '--run', dst, '--blob', blob);
    expect(replay.code).toBe(1);
    expect(replay.stderr).toMatch(/replayed or stale blob[^]*manager: blob [0-9a-f]{8} for vm .* \(a replayed or stale blob\)/);

    const back = await vtpm('guest', 'attach', '--run', src, '--domid', '1', '--vm', vm);
    expect(back.code).toBe(1);
    expect(back.stderr).toMatch(new RegExp(`^vtpm: VM ${vm} was migrated out of this host's manager[^]*attach the VM on the destination host[^]*manager: .*migrated out`));
    const qemu = await vtpm('qemu', 'attach', '--run', src, '--vm', vm, '--ctrl', join(work, 'q.sock'));
    expect(qemu.code).toBe(1);
    expect(qemu.stderr).toMatch(new RegExp(`^vtpm: VM ${vm} was migrated out of this host's manager[^]*manager: .*migrated out`));
    // The destination has it.
    await ok('guest', 'attach', '--run', dst, '--domid', '1', '--vm', vm);
  });
});
