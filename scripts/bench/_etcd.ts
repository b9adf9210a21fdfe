// A real etcd cluster on loopback for tests and the store bench: N `etcd` processes (Debian's
// etcd-server) on free ports, each with its own data directory, started together and killed after.
// Members can be killed and restarted one by one (same name, same data directory) to test quorum.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

interface Member {
  name: string;
  client: number;
  peer: number;
  dataDir: string;
  proc: ChildProcess | null;
  log: string;
}

/** PEM files: members serve TLS on their client port with `cert`/`key` and require client certificates signed by `ca`. */
export interface MemberTls {
  ca: string;
  cert: string;
  key: string;
}

export class EtcdCluster {
  readonly #members: Member[];
  readonly #initial: string;

  private constructor(
    readonly dir: string,
    members: Member[],
    readonly tls?: MemberTls,
  ) {
    this.#members = members;
    this.#initial = members.map((m) => `${m.name}=http://127.0.0.1:${m.peer}`).join(',');
  }

  /** Starts `size` members and waits until the cluster answers a linearizable read. */
  static async start(size = 3, opts: { dir?: string; tls?: MemberTls } = {}): Promise<EtcdCluster> {
    const dir = opts.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-etcd-'));
    const members: Member[] = [];
    for (let i = 0; i < size; i++) members.push({ name: `m${i}`, client: await freePort(), peer: await freePort(), dataDir: path.join(dir, `m${i}`), proc: null, log: '' });
    const c = new EtcdCluster(dir, members, opts.tls);
    try {
      for (let i = 0; i < size; i++) c.#spawn(i);
      await c.waitHealthy(30_000);
    } catch (err) {
      await c.stop();
      throw err;
    }
    return c;
  }

  /** `127.0.0.1:P,…`: what `--store etcd://` takes. */
  get endpoints(): string {
    return this.#members.map((m) => `127.0.0.1:${m.client}`).join(',');
  }

  get url(): string {
    return `etcd://${this.endpoints}`;
  }

  #spawn(i: number): void {
    const m = this.#members[i]!;
    const fresh = !fs.existsSync(m.dataDir);
    // A loaded machine stalls processes for hundreds of ms: a 250 ms heartbeat and 2.5 s election
    // timeout keep leadership stable there (leases shorter than 1.5 election timeouts are raised by etcd).
    const scheme = this.tls ? 'https' : 'http';
    const tls = this.tls ? ['--cert-file', this.tls.cert, '--key-file', this.tls.key, '--trusted-ca-file', this.tls.ca, '--client-cert-auth'] : [];
    const args = [
      '--name', m.name,
      '--data-dir', m.dataDir,
      '--listen-client-urls', `${scheme}://127.0.0.1:${m.client}`,
      '--advertise-client-urls', `${scheme}://127.0.0.1:${m.client}`,
      ...tls,
      '--listen-peer-urls', `http://127.0.0.1:${m.peer}`,
      '--initial-advertise-peer-urls', `http://127.0.0.1:${m.peer}`,
      '--initial-cluster', this.#initial,
      '--initial-cluster-state', fresh ? 'new' : 'existing',
      '--initial-cluster-token', path.basename(this.dir),
      '--heartbeat-interval', '250',
      '--election-timeout', '2500',
      '--log-level', 'warn',
    ];
    const proc = spawn('etcd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    m.log = '';
    proc.stderr?.on('data', (d: Buffer) => {
      m.log = (m.log + d.toString()).slice(-20_000);
    });
    m.proc = proc;
  }

  /** SIGKILL one member (its data directory stays for restart()). */
  async kill(i: number): Promise<void> {
    const m = this.#members[i]!;
    const p = m.proc;
    m.proc = null;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await gone;
  }

  restart(i: number): void {
    if (this.#members[i]!.proc) throw new Error(`etcd member ${i} is running`);
    this.#spawn(i);
  }

  async killAll(): Promise<void> {
    for (let i = 0; i < this.#members.length; i++) await this.kill(i);
  }

  restartAll(): void {
    for (let i = 0; i < this.#members.length; i++) if (!this.#members[i]!.proc) this.#spawn(i);
  }

  /** Waits until a quorum answers: a linearizable read through any running member. */
  async waitHealthy(ms: number): Promise<void> {
    const until = Date.now() + ms;
    for (;;) {
      for (const m of this.#members) {
        if (!m.proc) continue;
        try {
          if ((await this.#health(m.client)) === 'true') return;
        } catch {
          // not up yet
        }
      }
      if (Date.now() > until) throw new Error(`etcd cluster in ${this.dir} not healthy after ${ms} ms:\n${this.#members.map((m) => `${m.name}: ${m.log.slice(-2000)}`).join('\n')}`);
      await sleep(200);
    }
  }

  async #health(port: number): Promise<string | undefined> {
    if (!this.tls) {
      const r = await fetch(`http://127.0.0.1:${port}/health`, { signal: AbortSignal.timeout(2000) });
      return ((await r.json()) as { health?: string }).health;
    }
    const t = this.tls;
    return new Promise((resolve, reject) => {
      const req = https.get(
        { host: '127.0.0.1', port, path: '/health', ca: fs.readFileSync(t.ca), cert: fs.readFileSync(t.cert), key: fs.readFileSync(t.key), timeout: 2000 },
        (res) => {
          let body = '';
          res.on('data', (d: Buffer) => (body += d.toString()));
          res.on('end', () => resolve((JSON.parse(body) as { health?: string }).health));
        },
      );
      req.on('error', reject);
      req.on('timeout', () => req.destroy(new Error('timeout')));
    });
  }

  /** Kills every member and removes the data directories. */
  async stop(): Promise<void> {
    await this.killAll();
    fs.rmSync(this.dir, { recursive: true, force: true, maxRetries: 5 });
  }
}
