// Metrics are kept only by a process that loaded src/util/metrics.ts (the daemons, which serve them:
// docs/observability.md); that module registers itself here. A vTPM domain never loads it: it serves no
// metrics socket (the backend reads its /proc figures), so it neither loads prom-client nor spends
// anything per command on series nobody could read (docs/multi-vm.md, "A lean domain").
import type { backendMetrics, commandCount, forgetGuest, guestError, showGuest } from './metrics.js';

export interface MetricsSink {
  backendMetrics: typeof backendMetrics;
  commandCount: typeof commandCount;
  guestError: typeof guestError;
  showGuest: typeof showGuest;
  forgetGuest: typeof forgetGuest;
}

let sink: MetricsSink | null = null;

/** Called once by metrics.ts when it loads. */
export function registerMetrics(s: MetricsSink): void {
  sink = s;
}

/** Seconds since `t0` (a performance.now() reading), for durations observed into histograms. */
export function since(t0: number): number {
  return (performance.now() - t0) / 1000;
}

/** This process's metrics, or null when it keeps none. */
export function metricsSink(): MetricsSink | null {
  return sink;
}
