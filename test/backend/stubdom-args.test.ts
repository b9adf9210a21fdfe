// The stub domain's command line comes from dom0's backend; anything off is refused with the option named.
import { describe, expect, it } from 'vitest';
import { parseStubdomArgs } from '../../src/backend/stubdom-main.js';

const good = ['--instance', '3', '--domid', '28672', '--front-domid', '1', '--vm', 'ABCDEF01-2345-6789-abcd-ef0123456789', '--xs-socket', '/run/xs/dom28672.sock', '--xen-dir', '/dev/shm/x', '--manager-fds', '4,5'];

describe('stub domain arguments', () => {
  it('parses what dom0 passes (vm lower-cased, devid 0 and TPM 2.0 by default)', () => {
    expect(parseStubdomArgs([...good, '--created'])).toEqual({
      instance: 3,
      created: true,
      domid: 28672,
      frontDomid: 1,
      devid: 0,
      vm: 'abcdef01-2345-6789-abcd-ef0123456789',
      version: '2.0',
      xsSocket: '/run/xs/dom28672.sock',
      xenDir: '/dev/shm/x',
      managerFds: [4, 5],
    });
  });

  it.each([
    [['--domid', '0'], /--domid must be an integer 1\.\.32751, not 0/],
    [['--domid', '1e3'], /--domid must be an integer/],
    [['--front-domid', '40000'], /--front-domid must be an integer 1\.\.32751/],
    [['--tpm-version', '3.0'], /--tpm-version must be 2\.0 or 1\.2/],
    [['--manager-fds', '1,2'], /--manager-fds takes REQ,RSP descriptor numbers/],
  ])('refuses %j', (patch, why) => {
    const args = [...good];
    for (let i = 0; i < patch.length; i += 2) {
      const at = args.indexOf(patch[i]!);
      if (at >= 0) args[at + 1] = patch[i + 1]!;
      else args.push(patch[i]!, patch[i + 1]!);
    }
    expect(() => parseStubdomArgs(args)).toThrow(why);
  });

  it('needs a way to the manager', () => {
    const args = good.slice(0, -2);
    expect(() => parseStubdomArgs(args)).toThrow(/--manager-fds or --manager-run is required/);
  });
});
