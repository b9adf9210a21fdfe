// A hostile guest for test/integration/isolation: started by the test as a real guest domain (introduced, device
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

function tctiControl(port) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ host: '127.0.0.1', port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(Object.assign(new Error('no answer'), { code: 'ECONNRESET' }));
    }, 3000);
    s.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    s.on('data', (d) => {
      clearTimeout(timer);
      s.destroy();
      resolve(`answer ${d.toString('hex')}`);
    });
    s.on('close', () => {
      clearTimeout(timer);
      reject(Object.assign(new Error('closed without an answer'), { code: 'ECONNRESET' }));
    });
    s.on('connect', () => s.write(Buffer.from('00000001', 'hex')));
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
    if (o.tctiPort) {
      await attempt('tpm-command', `127.0.0.1:${o.tctiPort}`, () => tctiCommand(o.tctiPort));
      // The control port: CMD_GET_CAPABILITY (swtpm control protocol, u32 BE 1) answers 8 bytes.
      await attempt('tpm-command', `127.0.0.1:${o.tctiPort + 1}`, () => tctiControl(o.tctiPort + 1));
    }
  }
  // A user namespace would hand it every capability inside, and the kernel surface that comes with them.
  await attempt('new-user-namespace', 'unshare -U', async () => {
    const { spawnSync } = await import('node:child_process');
    const r = spawnSync('unshare', ['-U', 'true'], { encoding: 'utf8' });
    if (r.status !== 0) throw Object.assign(new Error(r.stderr.trim()), { code: /not permitted/i.test(r.stderr) ? 'EPERM' : 'EUNKNOWN' });
    return 'created';
  });
  // Whatever the hypervisor dir holds (domains' memory and sockets, the hypervisor's own socket).
  for (const f of cfg.xenFiles) {
    const p = join(cfg.xenDir, f);
    await attempt('open-rw', p, () => fs.closeSync(fs.openSync(p, 'r+')));
    await attempt('connect', p, () => connectUnix(p, Buffer.alloc(32)));
  }
  await attempt('connect', cfg.hypervisorSocket, () => connectUnix(cfg.hypervisorSocket, Buffer.alloc(16)));
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

// ---- xs_wire by hand: type, req_id, tx_id, len (u32 LE) + payload ----------------------------------
const XS_TRANSACTION_START = 6;
const XS_WRITE = 11;
const XS_ERROR = 16;

function xsFrame(type, req, tx, payload) {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeUInt32LE(req, 4);
  h.writeUInt32LE(tx, 8);
  h.writeUInt32LE(payload.length, 12);
  return Buffer.concat([h, payload]);
}

/** A raw xs_wire connection: send frames, await replies in order. */
function rawXs(path) {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(path);
    let buf = Buffer.alloc(0);
    const waiting = [];
    let closed = null;
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 16 && buf.length >= 16 + buf.readUInt32LE(12)) {
        const len = buf.readUInt32LE(12);
        const m = { type: buf.readUInt32LE(0), payload: buf.subarray(16, 16 + len) };
        buf = buf.subarray(16 + len);
        waiting.shift()?.resolve(m);
      }
    });
    const fail = (e) => {
      closed ??= e;
      for (const w of waiting.splice(0)) w.reject(closed);
    };
    s.on('error', (e) => fail(e));
    s.on('close', () => fail(Object.assign(new Error('xenstored closed the connection'), { code: 'ECONNRESET' })));
    s.once('connect', () =>
      resolve({
        socket: s,
        request(frame) {
          if (closed) return Promise.reject(closed);
          return new Promise((res, rej) => {
            waiting.push({ resolve: res, reject: rej });
            s.write(frame);
          });
        },
      }),
    );
    s.once('error', reject);
  });
}

/** `count` WRITEs of `size` bytes each, 16 in flight; resolves with how many succeeded and the first refusal. */
async function writeFlood(xs, tx, count, size, pathOf) {
  let ok = 0;
  let req = 100;
  const value = Buffer.alloc(size, 0x41);
  for (let i = 0; i < count; i += 16) {
    const batch = [];
    for (let j = i; j < Math.min(count, i + 16); j++) {
      batch.push(xs.request(xsFrame(XS_WRITE, req++, tx, Buffer.concat([Buffer.from(pathOf(j) + '\0'), value]))));
    }
    let refusal = null;
    for (const r of await Promise.allSettled(batch)) {
      if (r.status === 'rejected') refusal ??= `connection: ${r.reason.message}`;
      else if (r.value.type === XS_ERROR) refusal ??= r.value.payload.toString('latin1').replace(/\0$/, '');
      else ok++;
    }
    if (refusal) return { ok, refusal };
  }
  return { ok, refusal: null };
}

async function flood() {
  const home = `/local/domain/${cfg.domid}`;
  // One 2000-byte node rewritten 100 000 times inside one transaction, never committed.
  {
    const xs = await rawXs(cfg.xsSocket);
    const start = await xs.request(xsFrame(XS_TRANSACTION_START, 1, 0, Buffer.from('\0')));
    const tx = Number(start.payload.toString('latin1').replace(/\0$/, ''));
    const r = start.type === XS_ERROR ? { ok: 0, refusal: start.payload.toString() } : await writeFlood(xs, tx, 100_000, 2000, () => `${home}/data/tx`);
    out({ case: 'flood-transaction', target: cfg.xsSocket, outcome: r.refusal ? 'refused' : 'reached', detail: r });
    xs.socket.destroy();
  }
  // Many distinct nodes outside a transaction.
  {
    const xs = await rawXs(cfg.xsSocket);
    const r = await writeFlood(xs, 0, 20_000, 1024, (i) => `${home}/data/n${i}`);
    out({ case: 'flood-nodes', target: cfg.xsSocket, outcome: r.refusal ? 'refused' : 'reached', detail: r });
    xs.socket.destroy();
  }
}

async function halfFrames() {
  const held = [];
  const hold = (path, bytes) =>
    new Promise((resolve) => {
      const s = net.createConnection(path);
      s.on('error', (e) => resolve({ case: 'half-frame', target: path, outcome: REFUSED.has(e.code) ? 'refused' : 'error', code: e.code }));
      s.once('connect', () => {
        s.write(bytes);
        held.push(s);
        resolve({ case: 'half-frame', target: path, outcome: 'reached', detail: bytes.length });
      });
    });
  // Its own xenstore socket: 10 bytes of a header; then a header promising 4096 bytes and 100 of them.
  out(await hold(cfg.xsSocket, Buffer.from('0b000000010000000000', 'hex')));
  out(await hold(cfg.xsSocket, Buffer.concat([xsFrame(XS_WRITE, 2, 0, Buffer.alloc(0)).subarray(0, 12), Buffer.from([0, 16, 0, 0]), Buffer.alloc(100, 0x61)])));
  // The hypervisor's socket and everything else in its dir: half of a 32-byte hypercall.
  for (const p of [cfg.hypervisorSocket, ...cfg.xenFiles.map((f) => join(cfg.xenDir, f))]) out(await hold(p, Buffer.alloc(13, 1)));
  // Others' TCTI ports: half a TPM command header.
  for (const o of cfg.others) {
    if (!o.tctiPort) continue;
    out(
      await new Promise((resolve) => {
        const s = net.createConnection({ host: '127.0.0.1', port: o.tctiPort });
        s.on('error', (e) => resolve({ case: 'half-frame', target: `127.0.0.1:${o.tctiPort}`, outcome: 'refused', code: e.code }));
        s.once('connect', () => {
          s.write(Buffer.from('800100', 'hex'));
          held.push(s);
          s.once('close', () => resolve({ case: 'half-frame', target: `127.0.0.1:${o.tctiPort}`, outcome: 'refused', code: 'ECONNRESET' }));
          setTimeout(() => resolve({ case: 'half-frame', target: `127.0.0.1:${o.tctiPort}`, outcome: 'reached' }), 1000);
        });
      }),
    );
  }
  // Hold everything while the test watches the others.
  await new Promise((r) => setTimeout(r, cfg.holdMs ?? 3000));
  for (const s of held) s.destroy();
}

/** A connected v2 device through the library, then raw writes into its own memory and grant table. */
async function connectDevice(protocol = 'v2') {
  const { Domain } = await import('../../../dist/src/xen/index.js');
  const { connect } = await import('../../../dist/src/xenstore/client.js');
  const { TpmFront } = await import('../../../dist/src/frontend/tpmfront.js');
  const dom = await Domain.create({ domid: cfg.domid });
  const xs = await connect(cfg.xsSocket);
  const front = await TpmFront.connect({ xs, dom, devid: 0, protocol, onClosed: (reason) => out({ case: 'device-closed', outcome: 'ok', detail: reason }) });
  const rsp = await front.transmit(Buffer.from('80010000000c0000017b0008', 'hex'));
  out({ case: 'connected', outcome: 'ok', detail: Buffer.from(rsp).subarray(0, 10).toString('hex') });
  return { dom, xs, front };
}

async function transmitAfter(front, what) {
  const r = await Promise.race([
    front.transmit(Buffer.from('80010000000c0000017b0008', 'hex')).then(
      (rsp) => ({ outcome: 'reached', detail: Buffer.from(rsp).subarray(0, 10).toString('hex') }),
      (err) => ({ outcome: 'refused', code: 'ECUTOFF', message: String(err.message).slice(0, 200) }),
    ),
    new Promise((r) => setTimeout(() => r({ outcome: 'refused', code: 'ETIMEDOUT' }), 5000)),
  ]);
  out({ case: `command-after-${what}`, ...r });
}

async function scribble() {
  const { dom, front } = await connectDevice();
  const rnd = (n) => Math.floor(Math.random() * n);
  // First a violation the backend must see: the shared v2 page (the frame its ring-ref grants) says
  // SUBMIT with a length past the page, raw, with no library in between.
  const gfn = dom.views.grant32[2 * front.refs[0] + 1];
  const page = new DataView(dom.frames(gfn).buffer, dom.frames(gfn).byteOffset, 4096);
  page.setUint32(0, 0xffffffff, true);
  page.setUint8(4, 1);
  dom.evtchn.send(front.port);
  await new Promise((r) => setTimeout(r, 1000));
  // Random words over the whole grant table (flags, domid, frame) and random bytes over its frames,
  // the shared v2 page among them; then an event, as a guest announcing a command would.
  const g = dom.views.grant32;
  for (let i = 0; i < g.length; i++) g[i] = rnd(2 ** 32) | 0;
  for (let gfn = 0; gfn < dom.geometry.nrPages; gfn++) {
    if (typeof dom.populated === 'function' && !dom.populated(gfn)) continue;
    const f = dom.frames(gfn);
    for (let k = 0; k < 64; k++) f[rnd(f.length)] = rnd(256);
    new DataView(f.buffer, f.byteOffset, 16).setUint32(0, rnd(2 ** 32), true);
  }
  for (let k = 0; k < 16; k++) dom.evtchn.send(front.port);
  out({ case: 'scribbled', outcome: 'ok' });
  await transmitAfter(front, 'scribble');
}

async function truncate() {
  const { dom, front } = await connectDevice();
  // Keep the control area (grant table, event channels) so the guest can still notify; cut the frames,
  // the shared page among them, out from under the backend's mapping.
  const g = dom.geometry;
  const keep = 4096 * (1 + 2 * g.grantFrames + g.evtchnPages);
  const path = join(cfg.xenDir, `dom${cfg.domid}.mem`);
  await attempt('truncate', path, () => fs.truncateSync(path, keep));
  await attempt('truncate-fd', 'its own memory descriptors', () => {
    let n = 0;
    for (const fd of fs.readdirSync('/proc/self/fd')) {
      let t;
      try {
        t = fs.readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        continue;
      }
      if (t.includes(`dom${cfg.domid}.mem`) || t.startsWith('/memfd:')) {
        fs.ftruncateSync(Number(fd), keep);
        n++;
      }
    }
    return n;
  });
  for (let k = 0; k < 4; k++) {
    dom.evtchn.send(front.port);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Frames it allocates and never grants, filled with a pattern: no answer may ever land there. */
function canary(dom) {
  const gfn = dom.allocFrames(8);
  const f = dom.frames(gfn, 8);
  f.fill(0x5a);
  return { gfn, check: () => ({ checked: 8, changed: f.some((b) => b !== 0x5a) }) };
}

/** Run `step(i)` in a tight loop for `ms`, notifying the backend every 64 steps. */
function hammer(dom, port, ms, step) {
  const end = performance.now() + ms;
  let i = 0;
  while (performance.now() < end) {
    for (let k = 0; k < 64; k++, i++) step(i);
    dom.evtchn.send(port);
  }
  return i;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Double fetch on the v2 page: after SUBMIT, length, command bytes and state flip between a valid and
 * an invalid value while the backend reads. Each round ends with a valid SUBMIT and waits untouched
 * for FINISH: the answer then on the page must be one TPM response whose header size is its length,
 * within the page. Early rounds keep the length in range (answers expected); later ones flip it past
 * the page and the locality past 4 (a cut-off expected, unless the backend never read those values).
 */
async function dfetchV2() {
  const { dom, front } = await connectDevice('v2');
  // Started, so a whole GetRandom read gets a real answer and torn ones get the TPM's own errors.
  await front.transmit(Buffer.from('80010000000c000001440000', 'hex'));
  const gfn = dom.views.grant32[2 * front.refs[0] + 1];
  const f = dom.frames(gfn);
  const page = new DataView(f.buffer, f.byteOffset, 4096);
  const cmd = Buffer.from('80010000000c0000017b0008', 'hex');
  const junk = Buffer.from('c0defeedc0defeedc0defeed', 'hex');
  const fence = canary(dom);
  for (let round = 0; round < 8; round++) {
    const hostile = round >= 4;
    const lengths = hostile ? [12, 0xfffffff0, 12, 5000] : [12, 4088, 0, 12];
    f.set(cmd, 8);
    page.setUint32(0, 12, true);
    page.setUint8(5, 0);
    Atomics.store(f, 4, 1);
    dom.evtchn.send(front.port);
    const steps = hammer(dom, front.port, 300, (i) => {
      page.setUint32(0, lengths[i & 3], true);
      f.set(i & 1 ? junk : cmd, 8);
      if (hostile) page.setUint8(5, i & 2 ? 9 : 0);
      Atomics.store(f, 4, i & 1 ? 0xee : 1);
    });
    f.set(cmd, 8);
    page.setUint32(0, 12, true);
    page.setUint8(5, 0);
    Atomics.store(f, 4, 1);
    dom.evtchn.send(front.port);
    const t0 = performance.now();
    while (Atomics.load(f, 4) !== 2 && performance.now() - t0 < 2000) await sleep(5);
    if (Atomics.load(f, 4) !== 2) {
      out({ case: 'dfetch-v2-round', outcome: 'refused', code: 'ECUTOFF', detail: { round, hostile, steps, state: Atomics.load(f, 4) } });
      break;
    }
    const length = page.getUint32(0, true);
    const size = length >= 10 ? page.getUint32(8 + 2, false) : -1;
    out({ case: 'dfetch-v2-round', outcome: 'ok', detail: { round, hostile, steps, length, size, tag: page.getUint16(8, false), rc: length >= 10 ? page.getUint32(8 + 6, false) : -1 } });
  }
  out({ case: 'dfetch-other-frames', outcome: 'ok', detail: fence.check() });
}

/**
 * Double fetch on the ring: after a real request is pushed and notified, req_prod moves forwards
 * (past the ring) and backwards, and the slot's op, length, nr_segments and first gref flip between
 * valid and invalid values while the backend reads. Then the guest waits untouched: the request is
 * answered (every published response within its pages) or the guest is cut off.
 */
async function dfetchRing() {
  const { dom, front } = await connectDevice('ring');
  const gfn = dom.views.grant32[2 * front.refs[0] + 1];
  const f = dom.frames(gfn);
  const ring = new DataView(f.buffer, f.byteOffset, 4096);
  const idx = new Uint32Array(f.buffer, f.byteOffset, 4);
  const fence = canary(dom);
  const size = 2 ** Math.floor(Math.log2((4096 - 64) / 64));
  const answers = [];
  for (let round = 0; round < 4; round++) {
    const pending = front.transmit(Buffer.from('80010000000c0000017b0008', 'hex')).then(
      (rsp) => ({ outcome: 'ok', detail: Buffer.from(rsp).subarray(0, 10).toString('hex') }),
      (err) => ({ outcome: 'refused', code: 'ECUTOFF', message: String(err.message).slice(0, 200) }),
    );
    const p0 = Atomics.load(idx, 0);
    const slot = 64 + ((p0 - 1) & (size - 1)) * 64;
    const valid = Buffer.from(f.subarray(slot, slot + 64));
    const steps = hammer(dom, front.port, 300, (i) => {
      Atomics.store(idx, 0, [p0, (p0 + 1000) >>> 0, (p0 - 5) >>> 0, (p0 + 1) >>> 0][i & 3]);
      ring.setUint8(slot + 8, i & 4 ? 9 : 0);
      ring.setUint32(slot + 12, i & 1 ? 0xfffffff0 : 12, true);
      ring.setUint8(slot + 10, i & 2 ? 200 : 1);
      ring.setUint32(slot + 16, i & 8 ? 0x7ffffff0 : valid.readUInt32LE(16), true);
    });
    f.set(valid, slot);
    Atomics.store(idx, 0, p0);
    dom.evtchn.send(front.port);
    const r = await Promise.race([pending, sleep(3000).then(() => ({ outcome: 'refused', code: 'ETIMEDOUT' }))]);
    // Every response the backend published so far: its length within the request's pages.
    const rspProd = Atomics.load(idx, 2);
    const lengths = [];
    // (Not the slot it rewrote itself: its length field is the request's, written by the guest.)
    for (let k = Math.max(0, rspProd - size); k < rspProd; k++) {
      if ((k & (size - 1)) !== ((p0 - 1) & (size - 1))) lengths.push(ring.getUint32(64 + (k & (size - 1)) * 64 + 12, true));
    }
    answers.push(...lengths);
    out({ case: 'dfetch-ring-round', ...r, detail: { round, steps, reqProd: p0, rspProd, answer: r.detail, maxLength: Math.max(0, ...lengths) } });
    if (r.outcome !== 'ok') break;
  }
  out({ case: 'dfetch-other-frames', outcome: 'ok', detail: fence.check() });
}

/**
 * req_prod moved back behind what the backend already consumed, while its requests still run (nothing
 * answered for them yet): the ring lies about its indices.
 */
async function dfetchRingBack() {
  const { dom, front } = await connectDevice('ring');
  const gfn = dom.views.grant32[2 * front.refs[0] + 1];
  const f = dom.frames(gfn);
  const idx = new Uint32Array(f.buffer, f.byteOffset, 4);
  await front.transmit(Buffer.from('80010000000c000001440000', 'hex')); // TPM2_Startup(CLEAR)
  // TPM2_CreatePrimary of an RSA-2048 storage key under the owner (empty password): slow enough that
  // the backend is still running it when req_prod moves back.
  const createPrimary = Buffer.from(
    '80020000004300000131' + '40000001' + '00000009' + '40000009' + '0000' + '00' + '0000' + '000400000000' +
      '001a' + '0001000b00030072' + '0000' + '000600800043' + '0010' + '0800' + '00000000' + '0000' + '0000' + '00000000',
    'hex',
  );
  const pending = [];
  for (let k = 0; k < 2; k++) pending.push(front.transmit(createPrimary).then(() => 'ok', () => 'refused'));
  const p0 = Atomics.load(idx, 0);
  // The backend arms req_event one past what it consumed: wait until it took everything pushed.
  const t0 = performance.now();
  while (Atomics.load(idx, 1) !== ((p0 + 1) >>> 0) && performance.now() - t0 < 2000);
  const answered = Atomics.load(idx, 2);
  Atomics.store(idx, 0, (p0 - 1) >>> 0);
  dom.evtchn.send(front.port);
  const results = await Promise.race([Promise.all(pending), sleep(3000).then(() => ['timeout'])]);
  out({ case: 'dfetch-ring-back', outcome: results.includes('refused') ? 'refused' : 'ok', detail: { reqProd: p0, reqEvent: Atomics.load(idx, 1), answeredBefore: answered, results } });
}

async function main() {
  if (cfg.mode === 'probe') await probe();
  else if (cfg.mode === 'flood') await flood();
  else if (cfg.mode === 'half-frames') await halfFrames();
  else if (cfg.mode === 'scribble') await scribble();
  else if (cfg.mode === 'truncate') await truncate();
  else if (cfg.mode === 'dfetch-v2') await dfetchV2();
  else if (cfg.mode === 'dfetch-ring') await dfetchRing();
  else if (cfg.mode === 'dfetch-ring-back') await dfetchRingBack();
  else throw new Error(`unknown mode ${cfg.mode}`);
  out({ case: 'done' });
}

// The library's frontend reacts to what the guest did to it (closed device, failed mapping): note it, go on.
process.on('unhandledRejection', (err) => out({ case: 'library-error', outcome: 'ok', message: String(err?.message ?? err).slice(0, 200) }));

main().then(
  () => process.exit(0),
  (err) => {
    out({ case: 'crashed', outcome: 'error', message: String(err?.stack ?? err) });
    process.exit(1);
  },
);
