// The control receiver's deadline: swtpm gives a message 500 ms from its first byte, however it is cut;
// the receiver runs that clock itself (fake timers make the test exact and independent of load).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Cmd } from '../../src/swtpm/codes.js';
import { CtrlReceiver, type ReceiverEvent } from '../../src/swtpm/ctrl-receiver.js';

const bytes = (h: string): Uint8Array => new Uint8Array(Buffer.from(h.replace(/\s+/g, ''), 'hex'));

describe('CtrlReceiver deadline', () => {
  beforeEach(() => void vi.useFakeTimers());
  afterEach(() => void vi.useRealTimers());

  it('a message dripped in pieces is cut off 500 ms after its first byte, not after its last', () => {
    const expired: ReceiverEvent[] = [];
    const rx = new CtrlReceiver((ev) => expired.push(...ev));
    expect(rx.push(bytes('0000'))).toEqual([]);
    vi.advanceTimersByTime(300);
    expect(rx.push(bytes('0002 00'))).toEqual([]); // INIT, 1 of its 4 payload bytes
    vi.advanceTimersByTime(199);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1);
    expect(expired).toHaveLength(1);
    const ev = expired[0]!;
    expect(ev.kind).toBe('error');
    if (ev.kind === 'error') {
      expect(ev.err.code).toBe('TRUNCATED');
      expect(ev.err.result).toBeNull(); // swtpm hangs up without a reply
      expect(ev.err.fatal).toBe(true);
      expect(ev.err.command).toBe(Cmd.INIT);
    }
    expect(rx.pending).toBe(false);
  });

  it('a message completed in time stops the clock; the next message gets 500 ms of its own', () => {
    const expired: ReceiverEvent[] = [];
    const rx = new CtrlReceiver((ev) => expired.push(...ev));
    rx.push(bytes('0000'));
    vi.advanceTimersByTime(400);
    const done = rx.push(bytes('0002 00000000'));
    expect(done).toHaveLength(1);
    expect(done[0]!.kind).toBe('request');
    rx.push(bytes('0000 0005')); // SET_LOCALITY without its byte
    vi.advanceTimersByTime(499);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1);
    expect(expired).toHaveLength(1);
  });

  it('destroy() stops the clock and hands back the fds of a partial message', () => {
    const expired: ReceiverEvent[] = [];
    const rx = new CtrlReceiver((ev) => expired.push(...ev));
    rx.push(bytes('0000 000c 0000'), [42]); // GET_STATEBLOB, 2 of its 12 payload bytes
    expect(rx.destroy()).toEqual([42]);
    vi.advanceTimersByTime(1000);
    expect(expired).toEqual([]);
  });
});
