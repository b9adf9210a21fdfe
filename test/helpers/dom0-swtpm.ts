// The fixture of the backend channel tests: dom0 in a fresh hypervisor directory with a real swtpm on
// UNIX sockets to answer the guests' commands, started before a file's tests and stopped after them.
import { afterAll, beforeAll } from 'vitest';
import { Domain } from '../../src/xen/index.js';
import { freshXenDir } from './child.js';
import { SwtpmProcess } from './swtpm.js';
import { removeDir } from './temp.js';
import { TpmClient } from './tpm-client.js';

export interface Dom0Swtpm {
  readonly dir: string;
  /** Set once the file's beforeAll ran. */
  dom0: Domain;
  client: TpmClient;
}

export function useDom0Swtpm(): Dom0Swtpm {
  const fx = { dir: freshXenDir() } as Dom0Swtpm;
  let swtpm: SwtpmProcess | undefined;
  beforeAll(async () => {
    fx.dom0 = await Domain.create({ domid: 0, dir: fx.dir });
    swtpm = await SwtpmProcess.onSockets();
    fx.client = await TpmClient.connect({ path: swtpm.dataPath! });
  });
  afterAll(async () => {
    fx.client?.close();
    await swtpm?.stop();
    await fx.dom0?.destroy();
    removeDir(fx.dir);
  });
  return fx;
}
