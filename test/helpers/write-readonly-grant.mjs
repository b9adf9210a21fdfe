// Child for the grant-table test: map a read-only grant as domain 11, then try to write through it.
import { Domain } from '../../dist/src/xen/index.js';
const [dir, granter, ref] = process.argv.slice(2);
const dom = await Domain.create({ domid: 11, dir });
const m = dom.mapper.map(Number(granter), Number(ref), { readonly: true });
const v = new Uint8Array(m.buffer);
process.send({ kind: 'mapped', value: v[0] }, () => {
  v[0] = 1; // must fault
  process.exit(0);
});
