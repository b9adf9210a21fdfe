// Serving metrics: each daemon answers on a UNIX socket in the run directory (RUN/metrics/<role>.sock,
// root-only like the rest of the run directory), `/metrics` in Prometheus' text format and
// `/metrics.json` as prom-client's JSON; the backend merges every daemon's JSON into one exposition on
// `host up --metrics HOST:PORT` (docs/observability.md). A daemon that does not answer within the
// scrape timeout is reported by vtpm_daemon_up 0, the rest still served.
import http from 'node:http';
import fs from 'node:fs';
import { AggregatorRegistry, Gauge, Registry, type MetricObjectWithValues, type MetricValue } from 'prom-client';
import { initMetrics, registry, type DaemonName } from './metrics.js';

type MetricsJson = MetricObjectWithValues<MetricValue<string>>[];

/** The socket a daemon of role `role` serves its metrics on, inside the host's run directory. */
export function metricsSocket(runDir: string, role: string): string {
  return `${runDir}/metrics/${role}.sock`;
}

export class MetricsError extends Error {
  constructor(
    readonly code: 'UNREACHABLE' | 'BAD_ADDRESS' | 'BAD_REPLY',
    message: string,
  ) {
    super(message);
    this.name = 'MetricsError';
  }
}

async function answer(res: http.ServerResponse, url: string | undefined, reg: () => Promise<{ text: string; json: MetricsJson }>): Promise<void> {
  try {
    if (url === '/metrics.json') {
      const { json } = await reg();
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(json));
    } else if (url === '/metrics' || url === '/') {
      const { text } = await reg();
      res.writeHead(200, { 'content-type': registry.contentType }).end(text);
    } else res.writeHead(404).end('only /metrics and /metrics.json\n');
  } catch (err) {
    res.writeHead(500).end(`${(err as Error).message}\n`);
  }
}

const own = async (): Promise<{ text: string; json: MetricsJson }> => ({ text: await registry.metrics(), json: await registry.getMetricsAsJSON() });

/**
 * A daemon started by `host up` gets VTPM_METRICS_SOCKET: label its metrics with `role` and serve them
 * there. Returns the stop function (a no-op without the variable).
 */
export async function serveDaemonMetrics(role: DaemonName): Promise<() => Promise<void>> {
  const path = process.env.VTPM_METRICS_SOCKET;
  initMetrics(role);
  if (!path) return async () => {};
  fs.rmSync(path, { force: true });
  const server = http.createServer((req, res) => void answer(res, req.url, own));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  fs.chmodSync(path, 0o600);
  const ino = fs.statSync(path).ino;
  server.unref();
  return () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
      // Only our own socket: a successor (a restarted daemon) may have bound the name already.
      try {
        if (fs.statSync(path).ino === ino) fs.rmSync(path, { force: true });
      } catch {
        // gone already
      }
    });
}

/** GET `path` from the HTTP server on UNIX socket `socket`. */
export function getFromSocket(socket: string, path: string, timeoutMs = 2000): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get({ socketPath: socket, path, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString();
        if (res.statusCode === 200) resolve(body);
        else reject(new MetricsError('BAD_REPLY', `${socket}${path}: HTTP ${res.statusCode}: ${body.trim()}`));
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new MetricsError('UNREACHABLE', `${socket}: no answer in ${timeoutMs} ms`)));
    req.on('error', (err) => reject(err instanceof MetricsError ? err : new MetricsError('UNREACHABLE', `${socket}: ${err.message}`)));
  });
}

/** Every daemon's metrics as prom-client JSON, merged; the daemons that did not answer are listed. */
export async function gatherHost(runDir: string, roles: readonly string[], timeoutMs = 2000): Promise<{ json: MetricsJson[]; down: string[] }> {
  const got = await Promise.all(
    roles.map((r) =>
      getFromSocket(metricsSocket(runDir, r), '/metrics.json', timeoutMs).then(
        (body) => JSON.parse(body) as MetricsJson,
        () => null,
      ),
    ),
  );
  return { json: got.filter((g): g is MetricsJson => g !== null), down: roles.filter((_, i) => got[i] === null) };
}

/** Parse `HOST:PORT` (IPv6 in brackets). */
export function parseListen(spec: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):([0-9]{1,5})$/.exec(spec);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new MetricsError('BAD_ADDRESS', `--metrics takes HOST:PORT (e.g. 127.0.0.1:9464), not ${JSON.stringify(spec)}`);
  return { host: m[1] ?? m[2]!, port };
}

/** Whether `listen` (HOST:PORT) can be bound now; throws MetricsError naming why not. */
export async function checkListen(listen: string): Promise<void> {
  const { host, port } = parseListen(listen);
  const server = http.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new MetricsError('BAD_ADDRESS', `--metrics ${listen}: ${err.message}`)));
    server.listen(port, host, () => resolve());
  });
  await new Promise((resolve) => server.close(resolve));
}

/**
 * Serve the whole host's metrics on `listen` (HOST:PORT): this process's (the backend's) registry plus every other
 * daemon's, read from their sockets at each scrape. Resolves with the bound port and a stop function.
 */
export async function serveHostMetrics(
  listen: string,
  runDir: string,
  otherRoles: readonly string[],
): Promise<{ port: number; stop: () => Promise<void> }> {
  const { host, port } = parseListen(listen);
  const upReg = new Registry();
  const up = new Gauge({ name: 'vtpm_daemon_up', help: 'Whether the daemon answered this scrape (1) or not (0)', labelNames: ['daemon'] as const, registers: [upReg] });
  const merged = async (): Promise<{ text: string; json: MetricsJson }> => {
    const { json, down } = await gatherHost(runDir, otherRoles);
    up.reset();
    for (const r of otherRoles) up.set({ daemon: r }, down.includes(r) ? 0 : 1);
    const self = (await registry.getMetricsAsJSON()) as MetricsJson;
    up.set({ daemon: 'backend' }, 1);
    const agg = AggregatorRegistry.aggregate([self, ...json, (await upReg.getMetricsAsJSON()) as MetricsJson]);
    return { text: await agg.metrics(), json: (await agg.getMetricsAsJSON()) as MetricsJson };
  };
  const server = http.createServer((req, res) => void answer(res, req.url, merged));
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new MetricsError('BAD_ADDRESS', `--metrics ${listen}: ${err.message}`)));
    server.listen(port, host, () => resolve());
  });
  const bound = (server.address() as { port: number }).port;
  return {
    port: bound,
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
