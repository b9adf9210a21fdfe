import { afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ManagerClient } from '../../src/manager/client.js';
import { CLI } from './helpers.js';
import { tempDir } from '../helpers/temp.js';

// The crash test kills the manager process, which leaves the page cache intact, so it cannot tell a
// save made durable from one merely written. This test watches the system calls instead (strace) and
// checks that the acknowledgement of a SAVENVM leaves only after the log record holding the blob was
// written and fdatasync'd, and that the checkpoint at the clean stop makes the blob a file through
// fdatasync → rename → directory fsync → metadata rename → directory fsync, in that order.

interface Call {
  tid: number;
  name: string;
  args: string;
  result: string;
}

/** Completed calls in completion order, "unfinished … resumed" pairs joined. */
function parseStrace(text: string): Call[] {
  const open = new Map<number, { name: string; args: string }>();
  const out: Call[] = [];
  for (const line of text.split('\n')) {
    let m = /^(\d+) +(\w+)\((.*) <unfinished \.\.\.>$/.exec(line);
    if (m) {
      open.set(Number(m[1]), { name: m[2]!, args: m[3]! });
      continue;
    }
    m = /^(\d+) +<\.\.\. (\w+) resumed>(.*)\) += (.*)$/.exec(line);
    if (m) {
      const start = open.get(Number(m[1]));
      open.delete(Number(m[1]));
      out.push({ tid: Number(m[1]), name: m[2]!, args: (start?.args ?? '') + m[3]!, result: m[4]! });
      continue;
    }
    m = /^(\d+) +(\w+)\((.*)\) += (.*)$/.exec(line);
    if (m) out.push({ tid: Number(m[1]), name: m[2]!, args: m[3]!, result: m[4]! });
  }
  return out;
}

let proc: ChildProcess | null = null;
let managerPidFile = '';
afterEach(() => {
  try {
    process.kill(Number(fs.readFileSync(managerPidFile, 'utf8')), 'SIGKILL');
  } catch {
    // already gone
  }
  proc?.kill('SIGKILL');
  proc = null;
});

describe('durability order of a SAVENVM (strace of the real manager)', () => {
  it('acknowledges only after the log record is written and fdatasync\'d; checkpoints at stop in fdatasync, rename, dir fsync order', async () => {
    const stateDir = tempDir('dur-state');
    const runDir = tempDir('dur-run');
    const log = path.join(tempDir('dur-log'), 'strace.log');
    managerPidFile = path.join(runDir, 'manager.pid');
    proc = spawn(
      'strace',
      ['-f', '-o', log, '-e', 'trace=openat,fdatasync,fsync,rename,renameat,renameat2,write,pwrite64', process.execPath, CLI, 'manager', '--state', stateDir, '--run', runDir],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, UV_THREADPOOL_SIZE: '64' } },
    );
    const exited = new Promise((r) => proc!.on('exit', r));
    await new Promise<void>((resolve, reject) => {
      let err = '';
      proc!.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        if (/ready\n/.test(err)) resolve();
      });
      proc!.on('exit', () => reject(new Error(`manager under strace exited: ${err}`)));
    });

    const c = await ManagerClient.connect(runDir, { name: 'probe' });
    const { instance } = await c.open({ vmUuid: 'd0000000-0000-4000-8000-000000000001', version: '2.0' });
    await c.store(instance, 'permanent', Buffer.alloc(3000, 7));
    c.disconnect();
    process.kill(Number(fs.readFileSync(managerPidFile, 'utf8')), 'SIGTERM');
    await exited;

    const calls = parseStrace(fs.readFileSync(log, 'utf8'));
    const fdPath = new Map<string, string>();
    // Index of each completed call, with the path its fd named when the call completed.
    const events = calls.map((call, i) => {
      const fd = /^(\d+)/.exec(call.args)?.[1];
      const where = fd ? fdPath.get(fd) : undefined;
      if (call.name === 'openat' && /^\d+$/.test(call.result)) fdPath.set(call.result, /"([^"]+)"/.exec(call.args)![1]!);
      return { i, ...call, where };
    });
    const at = (pred: (e: (typeof events)[number]) => boolean, after: number, what: string): number => {
      const e = events.find((x) => x.i > after && pred(x));
      expect(e, `${what} after call #${after}`).toBeDefined();
      return e!.i;
    };
    const wal = path.join(stateDir, 'wal');
    const ack = at(
      (e) => e.name === 'write' && e.where === path.join(runDir, 'clients', 'probe.rsp.fifo') && e.args.includes(`, "\\0\\0\\0\\${instance}\\1\\301\\0\\0\\0\\n\\0\\0\\0\\0"`),
      -1,
      'the SAVENVM acknowledgement',
    );
    // The last log write before the acknowledgement carries the record with the sealed 3000-byte blob
    // ("VWAL" magic at its start) and is followed by an fdatasync of the log before the acknowledgement.
    const appends = events.filter((e) => e.name === 'pwrite64' && e.where === wal && e.i < ack);
    expect(appends.length).toBeGreaterThan(0);
    const append = appends[appends.length - 1]!;
    expect(append.args).toMatch(/^\d+, "VWAL/);
    expect(Number(/, (\d+), \d+$/.exec(append.args)![1])).toBeGreaterThan(3000);
    const walSync = at((e) => e.name === 'fdatasync' && e.where === wal, append.i, 'fdatasync of the log');
    expect(walSync).toBeLessThan(ack);
    // The clean stop checkpoints: blob file, then the metadata naming it, each made durable in order.
    const blob = fs.readdirSync(stateDir).find((f) => f.startsWith(`i${instance}.permanent.`))!;
    expect(blob).toBeDefined();
    const blobSync = at((e) => e.name === 'fdatasync' && e.where === path.join(stateDir, `${blob}.tmp`), ack, 'fdatasync of the blob temp file');
    const blobRename = at((e) => /^rename/.test(e.name) && e.args.includes(`${blob}.tmp"`) && e.result === '0', blobSync, 'rename of the blob');
    const dirSync1 = at((e) => e.name === 'fsync' && e.where === stateDir, blobRename, 'fsync of the state directory');
    const metaRename = at((e) => /^rename/.test(e.name) && e.args.includes('meta.tmp"'), dirSync1, 'rename of the metadata');
    at((e) => e.name === 'fsync' && e.where === stateDir, metaRename, 'second directory fsync');
    // The metadata temp file was made durable before it was renamed into place.
    const metaTmpSyncs = events.filter((e) => e.name === 'fdatasync' && e.where === path.join(stateDir, 'meta.tmp') && e.i < metaRename && e.i > ack);
    expect(metaTmpSyncs.length).toBeGreaterThan(0);
  });
});
