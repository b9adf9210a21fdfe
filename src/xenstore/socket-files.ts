// The daemon's UNIX socket files: listen (replacing a stale file, owner-only), close, remove.
import fs from 'node:fs';
import type net from 'node:net';

export function listen(server: net.Server, socketPath: string, owner?: number): Promise<void> {
  rmSocket(socketPath);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      try {
        // whoever can connect *is* that domain (dom0 on the main socket): owner only, like xenstored's
        fs.chmodSync(socketPath, 0o600);
        if (owner !== undefined) fs.chownSync(socketPath, owner, owner);
      } catch (err) {
        server.close();
        return reject(err instanceof Error ? err : new Error(String(err)));
      }
      resolve();
    });
  });
}

export function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) return resolve();
    server.close(() => resolve());
  });
}

export function rmSocket(p: string): void {
  try {
    if (fs.lstatSync(p).isSocket()) fs.unlinkSync(p);
  } catch {
    // absent: nothing to remove
  }
}
