// A hostile guest for test/isolation: started by the test as a real guest domain (introduced, device
// directories written, under its own uid when the host isolates domains). It goes around the library:
// raw fs, net and process calls against every path and descriptor of dom0 and of other domains, raw
// xs_wire frames, raw writes into its own shared memory. Each attempt prints one JSON line:
//   {"case": name, "target": what, "outcome": "refused" | "reached" | "ok" | "error", "code": errno?}
// "reached" means the boundary let it through. Usage: node raw-guest.mjs '<json config>'.
import fs from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const REFUSED = new Set(['EACCES', 'EPERM', 'ECONNREFUSED', 'ECONNRESET', 'EPIPE']);

async function attempt(name, target, f) {
  try {
    const detail = await f();
    out({ case: name, target, outcome: 'reached', ...(detail !== undefined ? { detail } : {}) });
  } catch (err) {
    const code = err && typeof err === 'object' && 'code' in err ? String(err.code) : 'EUNKNOWN';
    out({ case: name, target, outcome: REFUSED.has(code) ? 'refused' : 'error', code, message: String(err?.message ?? err).slice(0, 200) });
  }
}

function connectUnix(path, payload) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(path);
    s.once('error', reject);
    s.once('connect', () => {
      if (payload) s.write(payload);
      // Keep the half frame hanging for a while, as a stalled writer would.
      setTimeout(() => s.destroy(), 500);
      resolve('connected');
    });
  });
}

/** Connect to a TCP port and send one TPM2_GetRandom(8): reached only if a TPM answer comes back. */
function tctiCommand(port) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ host: '127.0.0.1', port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(Object.assign(new Error('no answer'), { code: 'ECONNRESET' }));
    }, 3000);
    let buf = Buffer.alloc(0);
    s.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length >= 10 && buf.length >= buf.readUInt32BE(2)) {
        clearTimeout(timer);
        s.destroy();
        resolve(`answer ${buf.subarray(0, 10).toString('hex')}`);
      }
    });
    s.on('close', () => {
      clearTimeout(timer);
      reject(Object.assign(new Error('closed without an answer'), { code: 'ECONNRESET' }));
    });
    s.on('connect', () => s.write(Buffer.from('80010000000c0000017b0008', 'hex')));
  });
}

async function probe() {
  // A positive control: the guest does reach its own xenstore socket.
  await attempt('own-xenstore', cfg.xsSocket, () => connectUnix(cfg.xsSocket));
  await attempt('read', cfg.hostJson, () => fs.readFileSync(cfg.hostJson, 'utf8').length);
  for (const d of [cfg.runDir, cfg.stateDir, cfg.managerRunDir, cfg.logDir, cfg.guestDir, cfg.xenDir, cfg.domainSocketDir]) {
    await attempt('list', d, () => fs.readdirSync(d).join(','));
  }
  await attempt('read', join(cfg.stateDir, 'master.key'), () => fs.readFileSync(join(cfg.stateDir, 'master.key')).length);
  await attempt('read', join(cfg.logDir, 'backend.log'), () => fs.readFileSync(join(cfg.logDir, 'backend.log')).length);
  await attempt('connect', cfg.dom0Socket, () => connectUnix(cfg.dom0Socket, Buffer.from('0100000001000000', 'hex')));
  for (const f of ['from_console.fifo', 'rendezvous.fifo', 'to_console.fifo']) {
    const p = join(cfg.managerRunDir, f);
    // 14 bytes of a 0x01C1 request header whose size promises more: a half frame, if it got through.
    await attempt('write-half-frame', p, () => {
      const fd = fs.openSync(p, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
      try {
        return fs.writeSync(fd, Buffer.from('0000000001c10080000a00000100', 'hex'));
      } finally {
        fs.closeSync(fd);
      }
    });
  }
  for (const o of cfg.others) {
    await attempt('connect', o.xsSocket, () => connectUnix(o.xsSocket, Buffer.from('01000000', 'hex')));
    await attempt('open-rw', join(cfg.xenDir, `dom${o.domid}.mem`), () => fs.closeSync(fs.openSync(join(cfg.xenDir, `dom${o.domid}.mem`), 'r+')));
    await attempt('open-ro', join(cfg.xenDir, `dom${o.domid}.mem`), () => fs.closeSync(fs.openSync(join(cfg.xenDir, `dom${o.domid}.mem`), 'r')));
    await attempt('connect', join(cfg.xenDir, `dom${o.domid}.evt`), () => connectUnix(join(cfg.xenDir, `dom${o.domid}.evt`), Buffer.from([1, 0])));
    await attempt('read', join(cfg.guestDir, `dom${o.domid}.json`), () => fs.readFileSync(join(cfg.guestDir, `dom${o.domid}.json`), 'utf8').length);
    // Replace another guest's record (its pid is what `host down` signals).
    await attempt('replace', join(cfg.guestDir, `dom${o.domid}.json`), () => {
      const tmp = join(cfg.guestDir, `raw-${process.pid}.tmp`);
      fs.writeFileSync(tmp, JSON.stringify({ domid: o.domid, pid: 1 }));
      try {
        fs.renameSync(tmp, join(cfg.guestDir, `dom${o.domid}.json`));
      } catch (err) {
        fs.rmSync(tmp, { force: true });
        throw err;
      }
    });
    if (o.tctiPort) await attempt('tpm-command', `127.0.0.1:${o.tctiPort}`, () => tctiCommand(o.tctiPort));
  }
  // dom0's own objects under the hypervisor dir: its memory and its event-channel socket.
  await attempt('open-rw', join(cfg.xenDir, 'dom0.mem'), () => fs.closeSync(fs.openSync(join(cfg.xenDir, 'dom0.mem'), 'r+')));
  await attempt('connect', join(cfg.xenDir, 'dom0.evt'), () => connectUnix(join(cfg.xenDir, 'dom0.evt'), Buffer.from([1, 0])));
  for (const p of cfg.pids) {
    await attempt('list', `/proc/${p.pid}/fd (${p.role})`, () => fs.readdirSync(`/proc/${p.pid}/fd`).length);
    await attempt('open-rw', `/proc/${p.pid}/mem (${p.role})`, () => fs.closeSync(fs.openSync(`/proc/${p.pid}/mem`, 'r+')));
    await attempt('read', `/proc/${p.pid}/environ (${p.role})`, () => fs.readFileSync(`/proc/${p.pid}/environ`).length);
    await attempt('signal', `${p.pid} (${p.role})`, () => process.kill(p.pid, 0));
    // Every descriptor it holds, reopened through /proc (the way around a path it cannot reach).
    for (let fd = 0; fd < 24; fd++) {
      const link = `/proc/${p.pid}/fd/${fd}`;
      let target;
      try {
        target = fs.readlinkSync(link);
      } catch (err) {
        if (err.code === 'ENOENT') continue;
        await attempt('readlink', `${link} (${p.role})`, () => {
          throw err;
        });
        break;
      }
      await attempt('open', `${link} -> ${target} (${p.role})`, () => fs.closeSync(fs.openSync(link, 'r')));
    }
  }
}

async function main() {
  if (cfg.mode === 'probe') await probe();
  out({ case: 'done' });
}

main().then(
  () => process.exit(0),
  (err) => {
    out({ case: 'crashed', outcome: 'error', message: String(err?.stack ?? err) });
    process.exit(1);
  },
);
