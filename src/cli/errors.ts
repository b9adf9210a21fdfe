// What the CLI says when something fails: one error class with a code (the exit status follows from
// it, see docs/cli.md), and the manager's VTPM_* statuses turned into what was wrong and what to do,
// by meaning, in this one place.
import fs from 'node:fs';
import type { ManagerError } from '../manager/client.js';
import { Ord, Status } from '../manager/wire.js';

export type CliErrorCode = 'USAGE' | 'NOT_FOUND' | 'CONFLICT' | 'REFUSED' | 'HOST_DOWN' | 'FAILED';

/** Exit status of `vtpm` for each code: 2 for a command line that cannot work, 1 for the rest. */
export const EXIT_CODES: Record<CliErrorCode, number> = { USAGE: 2, NOT_FOUND: 1, CONFLICT: 1, REFUSED: 1, HOST_DOWN: 1, FAILED: 1 };

export class CliError extends Error {
  constructor(
    readonly code: CliErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'CliError';
  }
}

/** What the manager's refusal of `ordinal` means for the user, and what to do (statuses: docs/manager.md). */
function meaning(ordinal: number, status: number, what: string): string {
  const policy = status === Status.AUTHFAIL;
  const param = status === Status.BAD_PARAMETER;
  const crypto = status === Status.DECRYPT_ERROR;
  switch (ordinal) {
    case Ord.MIGRATE_OUT:
      if (policy) return `${what} cannot be sent there: it was already migrated out to another destination`;
      if (param) return `${what} cannot be sent: it is unknown to this manager, was opened non-migratable, or no such migration key is loaded (check --vm/--instance and --to-key)`;
      break;
    case Ord.MIGRATE_IN:
      if (policy) return 'the blob was refused: it is a replayed or stale blob (this manager already took in or sent out that VM at this counter or later)';
      if (param) return 'the blob was refused: not a migration blob, or its VM is already here (delete that vTPM first), or --instance is taken';
      if (crypto) return 'the blob was refused: it was sealed to another manager\'s key, or it was tampered with or damaged (authentication failed)';
      break;
    case Ord.LOAD_MIG_KEY:
      if (param) return 'the destination key was refused: not an RSA public key of the size the manager accepts';
      break;
    case Ord.OPEN:
      if (param) return `${what} cannot be opened: it was migrated out of this manager (its state stays frozen here until deleted) or is already open`;
      if (policy) return `${what} is held by another host sharing this etcd store: detach it there (or wait for that host's lease to expire)`;
      break;
  }
  if (status === Status.FAIL || status === Status.IOERROR) return 'the manager failed to carry out the request (a storage error?)';
  if (status === Status.RESOURCES) return 'the manager is out of room (VM table full?)';
  if (status === Status.BAD_ORDINAL) return 'this manager does not take that request here';
  if (policy) return `the manager does not allow the request for ${what}`;
  if (param) return `the manager found the request for ${what} invalid`;
  if (crypto) return `the manager could not authenticate the stored or sent state of ${what}`;
  return `the manager answered status ${status}`;
}

/** One status covers several causes: the manager's reason, when at hand, tells which one it was. */
function specific(reason: string | undefined, what: string): string | undefined {
  if (reason === undefined) return undefined;
  if (/ of unknown (vm|instance)\b|unknown instance/.test(reason)) return `${what} is unknown to this manager (check --vm/--instance)`;
  if (/NON_MIGRATABLE/.test(reason)) return `${what} was opened non-migratable: it cannot be migrated`;
  if (/a replayed or stale blob/.test(reason)) return 'the blob was refused: it is a replayed or stale blob (this manager already took in or sent out that VM at this counter or later)';
  if (/already went to/.test(reason)) return `${what} was already migrated out to another destination; only that one can be sent it again`;
  return undefined;
}

// By shape, not instanceof: loading the manager client here would load native code before the
// commands that need it set koffi up (native/koffi-config.ts).
function isManagerError(err: unknown): err is ManagerError {
  return err instanceof Error && err.name === 'ManagerError' && 'code' in err;
}

/**
 * A manager error as a CLI error: the meaning, then the manager's own reason when its log is at hand
 * (`reason`: the log line the manager wrote for this refusal).
 */
export function explainManagerError(err: unknown, ordinal: number, what: string, reason?: string): Error {
  if (!isManagerError(err)) return err instanceof Error ? err : new Error(String(err));
  if (err.code === 'DISCONNECTED') return new CliError('HOST_DOWN', `the manager went away (${err.message}); is it running? see \`vtpm host status\``);
  if (err.code !== 'STATUS' || err.status === undefined) return new CliError('FAILED', err.message);
  const text = specific(reason, what) ?? meaning(ordinal, err.status, what);
  return new CliError('REFUSED', reason ? `${text}\n  manager: ${reason}` : text);
}

/**
 * The manager's own reason for refusing `ordinal`: the line it logged for it after `offset` in its log
 * ("<who>: <ORDINAL> on instance N: <reason>; answered <status>"), if that log is at hand.
 */
export function managerReason(logFile: string | undefined, offset: number, ordinal: string): string | undefined {
  if (!logFile) return undefined;
  let text: string;
  try {
    text = fs.readFileSync(logFile).subarray(offset).toString();
  } catch {
    return undefined;
  }
  const re = new RegExp(`: ${ordinal} on instance \\d+: (.*); answered \\S+$`);
  let reason: string | undefined;
  for (const raw of text.split('\n')) {
    const line = logMessage(raw);
    const m = re.exec(line);
    if (m) reason = m[1];
  }
  return reason;
}

/** A log line's message: the line itself, or the `msg` of a `--log-format json` line. */
function logMessage(line: string): string {
  if (!line.startsWith('{')) return line;
  try {
    const o = JSON.parse(line) as { msg?: unknown };
    return typeof o.msg === 'string' ? o.msg : line;
  } catch {
    return line;
  }
}

export function fileSize(file: string | undefined): number {
  try {
    return file ? fs.statSync(file).size : 0;
  } catch {
    return 0;
  }
}

/** A vTPM the backend could not open for `vm`: what the manager's reason means, the backend's words, the reason. */
export function openRefusal(vm: string, backendText: string, managerText: string | undefined): CliError {
  if (managerText === undefined) return new CliError('REFUSED', backendText);
  const what = /migrated out/.test(managerText) ? `VM ${vm} was migrated out of this host's manager: its vTPM stays frozen here; attach the VM on the destination host\n  ` : '';
  return new CliError('REFUSED', `${what}${backendText}\n  manager: ${managerText}`);
}
