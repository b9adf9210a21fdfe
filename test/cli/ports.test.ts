// The TCTI port pair a guest listens on: both free, and out of the kernel's ephemeral range, where a
// port handed out meanwhile (another process's listen on port 0 or outgoing connection) could take P+1.
import fs from 'node:fs';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { freePortPair } from '../../src/cli/ports.js';

describe('freePortPair', () => {
  it('gives P and P+1, both free, below the ephemeral range', async () => {
    const low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'latin1').trim().split(/\s+/)[0]);
    for (let i = 0; i < 20; i++) {
      const p = await freePortPair();
      expect(p + 1).toBeLessThan(low);
      expect(p).toBeGreaterThanOrEqual(10_000);
      for (const port of [p, p + 1]) {
        const s = net.createServer();
        await new Promise<void>((resolve, reject) => {
          s.once('error', reject);
          s.listen(port, '127.0.0.1', () => resolve());
        });
        await new Promise((r) => s.close(r));
      }
    }
  });

});
