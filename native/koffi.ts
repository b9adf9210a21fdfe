// koffi without its package loader. That loader (index.js) pulls in node:https, node:zlib and
// node:crypto to be able to download binaries, about 2.5 MiB of heap in every process, and each guest
// and vTPM domain is a process (docs/multi-vm.md, "A lean domain"). On glibc Linux x64/arm64 the
// prebuilt binary koffi ships is loaded directly, after the same version check its loader makes;
// anywhere else, or if that fails, the package's own loader runs.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

type Koffi = typeof import('koffi');

const require = createRequire(import.meta.url);

function load(): Koffi {
  if (process.platform === 'linux' && (process.arch === 'x64' || process.arch === 'arm64')) {
    try {
      const root = dirname(require.resolve('koffi'));
      const native = require(join(root, 'build', 'koffi', `linux_${process.arch}`, 'koffi.node')) as Koffi & { version?: string };
      const pkg = require(join(root, 'package.json')) as { version: string };
      if (native.version === pkg.version) return native;
    } catch {
      // a musl system, a stripped install: the package's loader finds what fits
    }
  }
  return require('koffi') as Koffi;
}

const koffi: Koffi = load();
export default koffi;
