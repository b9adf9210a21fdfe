// Finding a free pair of loopback TCP ports (P for TPM data, P+1 for control, as swtpm's TCTI expects).
// The pair is chosen below the kernel's ephemeral range (ip_local_port_range): a port the kernel hands
// out (listen on port 0, or the source port of any outgoing connection on the host) could otherwise
// take P+1 between this check and the guest's listen.
import fs from 'node:fs';
import net from 'node:net';

function tryListen(port: number): Promise<net.Server | null> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(null));
    s.listen(port, '127.0.0.1', () => resolve(s));
  });
}

/** The lowest port of the kernel's ephemeral range (Linux's default when it cannot be read). */
function ephemeralLow(): number {
  try {
    const low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'latin1').trim().split(/\s+/)[0]);
    return Number.isInteger(low) && low > 2048 ? low : 32768;
  } catch {
    return 32768;
  }
}

export async function freePortPair(): Promise<number> {
  const low = 10_000;
  const high = ephemeralLow() - 2;
  for (let i = 0; i < 200; i++) {
    const p = low + Math.floor(Math.random() * (high - low + 1));
    const a = await tryListen(p);
    if (!a) continue;
    const b = await tryListen(p + 1);
    await new Promise((r) => a.close(r));
    if (b) {
      await new Promise((r) => b.close(r));
      return p;
    }
  }
  throw new Error('no free pair of loopback ports');
}
