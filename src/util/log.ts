// One log sink per daemon: the text lines every daemon always wrote (the default), or with
// `--log-format json` one JSON object per line through pino, carrying `daemon`, `event` and, when the
// line names them, `domid`, `vm` and `instance` (docs/observability.md). Either way the line is escaped
// first (log-escape.ts): a guest string can neither split a line nor hide in one.
import { pino, type Logger } from 'pino';
import { escapeLogLine } from './log-escape.js';

export type LogFormat = 'text' | 'json';

export class LogFormatError extends Error {
  readonly code = 'BAD_LOG_FORMAT';
  constructor(given: string) {
    super(`--log-format takes text or json, not ${JSON.stringify(given)}`);
    this.name = 'LogFormatError';
  }
}

export function parseLogFormat(v: string | undefined): LogFormat {
  if (v === undefined || v === 'text') return 'text';
  if (v === 'json') return 'json';
  throw new LogFormatError(v);
}

/** Structured fields of one event; what a line does not give is read from its text. */
export interface LogFields {
  event?: string;
  domid?: number;
  vm?: string;
  instance?: number;
}

// The daemons' lines name a guest as `dom<N>`, a VM by its uuid and a vTPM as `instance N` / `vTPM N`.
const DOMID = /\bdom([0-9]{1,5})\b/;
const VM = /\b(?:VM|vm) ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b/;
const INSTANCE = /\b(?:instance|vTPM) ([0-9]{1,10})\b/;
/** First match wins: the event name of a line, from what it says happened. */
const EVENTS: Array<[RegExp, string]> = [
  [/: ready\b/, 'ready'],
  [/\bcut off\b/, 'cut_off'],
  [/\brequest [0-9]+: |\bmore refusals in\b/, 'request_refused'],
  [/; answered [A-Z_]+/, 'request_refused'],
  [/\bconnected \(/, 'connected'],
  [/\bsuspended\b/, 'suspended'],
  [/\brecovering\b/, 'recovering'],
  [/\bdied\b|\brestarted\b/, 'domain_restart'],
  [/\battached\b/, 'attached'],
  [/\bdetached\b|\bremoved\b/, 'detached'],
  [/\b(?:created|resumed|loaded) instance\b|\binstance [0-9]+ .*(?:created|resumed|loaded)/, 'vtpm_open'],
  [/\bclos(?:ed|ing)\b/, 'closed'],
  [/\bstopped\b/, 'stopped'],
  [/\bfailed\b|\berror\b/i, 'error'],
];

export function fieldsOf(line: string): LogFields {
  const f: LogFields = {};
  const d = DOMID.exec(line);
  if (d) f.domid = Number(d[1]);
  const v = VM.exec(line);
  if (v) f.vm = v[1]!;
  const i = INSTANCE.exec(line);
  if (i) f.instance = Number(i[1]);
  f.event = EVENTS.find(([re]) => re.test(line))?.[1] ?? 'message';
  return f;
}

export type LogSink = (line: string, fields?: LogFields) => void;

/**
 * The sink of daemon `daemon`. `text` writes `textLine(escaped)` to `stream` exactly as before;
 * `json` writes one pino object per line to the same stream.
 */
export function makeLog(daemon: string, format: LogFormat, stream: 'stdout' | 'stderr', textLine: (escaped: string) => string): LogSink {
  const fd = stream === 'stdout' ? 1 : 2;
  if (format === 'text') {
    const out = stream === 'stdout' ? process.stdout : process.stderr;
    return (line) => void out.write(textLine(escapeLogLine(line)));
  }
  const logger: Logger = pino(
    { base: { daemon, pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime, messageKey: 'msg' },
    pino.destination({ fd, sync: true }),
  );
  return (line, fields) => logger.info({ ...fieldsOf(line), ...fields }, escapeLogLine(line));
}
