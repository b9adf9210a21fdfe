// Shared bits of the multi-VM tests: the CLI, host status, and a persistent client of a guest's TCTI
// data port (raw TPM commands, responses framed by their own header size) that times every command.
import fs from 'node:fs';
import { join } from 'node:path';
import { TpmClient } from '../../helpers/tpm-client.js';

import { vtpm } from '../../helpers/host.js';

export { run, tcti, vtpm } from '../../helpers/host.js';

export interface Proc {
  role: string;
  domid: number;
  pid: number;
  alive: boolean;
  vm?: string;
  instance?: number;
}

export async function status(runDir: string): Promise<{ mode: string; processes: Proc[] }> {
  return JSON.parse((await vtpm('host', 'status', '--run', runDir, '--json')).stdout) as { mode: string; processes: Proc[] };
}


/** One TCP connection to a TCTI bridge's data port; one command at a time. */
export class DataClient {
  private constructor(readonly client: TpmClient) {}

  static async connect(port: number): Promise<DataClient> {
    return new DataClient(await TpmClient.connect({ port }));
  }

  /** Send one command; resolves with the response (or rejects after timeoutMs: a hang). */
  async transmit(cmd: Uint8Array, timeoutMs = 10_000): Promise<Buffer> {
    return Buffer.from(await this.client.transmit(cmd, timeoutMs));
  }

  close(): void {
    this.client.close();
  }
}

export const rc = (rsp: Buffer): number => rsp.readUInt32BE(6);

/** Print the tail of every log of the host in runDir (backend, manager, guests) to stderr. */
export function dumpLogs(runDir: string, lines = 40): void {
  const dir = join(runDir, 'logs');
  let names: string[] = [];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const text = fs.readFileSync(join(dir, n), 'utf8').split('\n').slice(-lines).join('\n');
    process.stderr.write(`----- ${n} -----\n${text}\n`);
  }
}
