// Log lines carry strings guests wrote (xenstore values, client names, error texts quoting them). A
// guest must not be able to forge a line, split one, or send escape sequences to whoever reads the
// log, so every daemon escapes its lines at the sink, and quotes guest strings where it names them
// (docs/fuzzing.md). Imports nothing: every layer may use it.

/** Longest guest string a log line quotes; the rest is counted, not shown. */
export const QUOTE_MAX = 120;

// C0 controls, DEL, C1 controls, and the Unicode line separators and bidi overrides that reorder or
// break a line on a terminal.
const UNSAFE_IN_LINE = /[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

function hexEscape(c: string): string {
  const n = c.charCodeAt(0);
  if (c === '\n') return '\\n';
  if (c === '\r') return '\\r';
  if (c === '\t') return '\\t';
  return n <= 0xff ? `\\x${n.toString(16).padStart(2, '0')}` : `\\u${n.toString(16).padStart(4, '0')}`;
}

/**
 * A guest-controlled string as a log field: double-quoted, with `\`, `"` and everything outside
 * printable ASCII escaped (\n, \xNN, \uNNNN), at most QUOTE_MAX characters shown.
 */
export function quoteGuest(s: string | Uint8Array, max = QUOTE_MAX): string {
  const text = typeof s === 'string' ? s : Buffer.from(s.buffer, s.byteOffset, s.byteLength).toString('latin1');
  const shown = text.length > max ? text.slice(0, max) : text;
  const body = shown.replace(/[^\u0020-\u007e]|["\\]/g, (c) => (c === '"' || c === '\\' ? `\\${c}` : hexEscape(c)));
  return `"${body}"${text.length > max ? `...(+${text.length - max} chars)` : ''}`;
}

/** A whole log line made safe to write: it stays one line and carries no control or bidi characters. */
export function escapeLogLine(line: string): string {
  return line.replace(UNSAFE_IN_LINE, hexEscape);
}
