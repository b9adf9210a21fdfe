// Which process is alive, for run directories (guest and daemon records) and for reclaiming the memory
// file of a domain whose process died. A pid alone is not enough: a process killed with -9 stays a
// zombie until its parent reaps it (kill(pid, 0) still succeeds), and pids are reused.
import fs from 'node:fs';

/**
 * The process's start time in clock ticks since boot (/proc/<pid>/stat field 22) and its state letter,
 * or null when there is no such process. Together with the pid this names one process for good: pids
 * are reused, start times of a reused pid differ.
 */
const statBuf = Buffer.alloc(1024);

export function procStat(pid: number): { state: string; start: number } | null {
  try {
    // One read into a reused buffer (the file is under 1 KiB): readFileSync's fstat and growing reads
    // cost about three times as much, and a resuming guest checks its backend this way.
    const fd = fs.openSync(`/proc/${pid}/stat`, 'r');
    let n: number;
    try {
      n = fs.readSync(fd, statBuf, 0, statBuf.length, 0);
    } finally {
      fs.closeSync(fd);
    }
    const text = statBuf.toString('latin1', 0, n);
    // The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return { state: rest[0]!, start: Number(rest[19]) };
  } catch {
    return null;
  }
}

/**
 * Whether `pid` is a live process (and, given `start`, still the one that started then). A zombie is
 * dead: a guest killed with -9 stays a zombie until its parent reaps it, and must not count as attached.
 */
export function processAlive(pid: number, start?: number): boolean {
  if (!pid || pid < 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const st = procStat(pid);
  if (!st) return false;
  if (st.state === 'Z' || st.state === 'X') return false;
  return start === undefined || st.start === start;
}

/** CPU seconds (user + system) and resident bytes of `pid`, or null when there is no such process. */
export function procUsage(pid: number): { cpuSeconds: number; rssBytes: number } | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields 14 and 15 (utime, stime) in clock ticks; Linux reports USER_HZ = 100 to user space.
    const cpuSeconds = (Number(rest[11]) + Number(rest[12])) / 100;
    const rssPages = Number(fs.readFileSync(`/proc/${pid}/statm`, 'latin1').split(' ')[1]);
    return { cpuSeconds, rssBytes: rssPages * 4096 };
  } catch {
    return null;
  }
}
