// Finding a free pair of loopback TCP ports (P for TPM data, P+1 for control, as swtpm's TCTI expects).
import net from 'node:net';

function tryListen(port: number): Promise<net.Server | null> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(null));
    s.listen(port, '127.0.0.1', () => resolve(s));
  });
}

export async function freePortPair(): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const a = await tryListen(0);
    if (!a) continue;
    const p = (a.address() as net.AddressInfo).port;
    const b = p < 65535 ? await tryListen(p + 1) : null;
    await new Promise((r) => a.close(r));
    if (b) {
      await new Promise((r) => b.close(r));
      return p;
    }
  }
  throw new Error('no free pair of loopback ports');
}
