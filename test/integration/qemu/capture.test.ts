// `qemu attach --pcap`: the VM's TPM commands over the swtpm data channel, as QEMU sends them, land in a
// pcapng file tshark's TPM 2.0 dissector decodes (one stream per CMD_INIT), and in the metrics under
// transport="qemu" (docs/observability.md).
import { afterAll, beforeAll, expect, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { closeFd, sendWithFds, socketPair } from '../../../native/unix-rights.js';
import { CtrlClient, DataClient, TPM2, TestHost, exec, vtpm } from './helpers.js';
import { getFromSocket, metricsSocket } from '../../../src/util/metrics-http.js';
import { tempDir, removeDir } from '../../helpers/temp.js';

const work = tempDir('qemu-pcap');
const vm = randomUUID();
const ctrl = join(work, 'ctrl.sock');
const pcap = join(work, 'vm.pcapng');
let host: TestHost;

beforeAll(async () => {
  host = await TestHost.up(work);
  await vtpm('qemu', 'attach', '--run', host.run, '--vm', vm, '--ctrl', ctrl, '--pcap', pcap, '--pcap-max-mb', '1');
});
afterAll(async () => {
  await host.down();
  removeDir(work);
});

it('captures the data channel\'s commands as TCP port 2321 and counts them under transport qemu', async () => {
  const c = await CtrlClient.connect(ctrl);
  const [mine, theirs] = socketPair();
  sendWithFds(c.fd, Buffer.from('00000010', 'hex'), [theirs]);
  closeFd(theirs);
  expect((await c.read(4)).toString('hex')).toBe('00000000'); // SET_DATAFD
  const data = new DataClient(mine);
  expect(await c.cmd('00000002 00000000', 4)).toBe('00000000'); // INIT
  expect((await data.transmit(TPM2.startupClear)).slice(12, 20)).toBe('00000000');
  expect((await data.transmit(TPM2.extend16)).slice(12, 20)).toBe('00000000');
  expect((await data.transmit(TPM2.pcrRead16)).slice(12, 20)).toBe('00000000');
  const metrics = await getFromSocket(metricsSocket(host.run, 'backend'), '/metrics');
  expect(metrics).toContain(`vtpm_commands_total{domid="",vm="${vm}",transport="qemu",command="PCR_Extend",rc="success",daemon="backend"} 1`);
  expect(metrics).toContain('vtpm_guests{transport="qemu",state="Connected",daemon="backend"} 1');
  data.close();
  c.close();
  // Detaching closes the capture (everything written).
  await vtpm('qemu', 'detach', '--run', host.run, '--vm', vm);
  const { stdout } = await exec('tshark', ['-r', pcap, '-Y', 'tpm', '-T', 'fields', '-e', 'tcp.stream', '-e', 'tpm.req.cc', '-e', 'tpm.resp.rc']);
  expect(stdout.trim().split('\n').map((l) => l.split('\t'))).toEqual([
    ['0', '0x00000144', ''],
    ['0', '', '0x00000000'],
    ['0', '0x00000182', ''],
    ['0', '', '0x00000000'],
    ['0', '0x0000017e', ''],
    ['0', '', '0x00000000'],
  ]);
});
