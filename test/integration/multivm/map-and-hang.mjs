// Child for the grant-release test: as domain 12, map two of dom0's grants writably and one read-only,
// report, then wait to be killed with the pins still held.
import { Domain } from '../../../dist/src/xen/index.js';
const [dir, granter, ...refs] = process.argv.slice(2);
const dom = await Domain.create({ domid: 12, dir });
const maps = refs.map((r, i) => dom.mapper.map(Number(granter), Number(r), { readonly: i === 2 }));
process.send({ kind: 'mapped', n: maps.length });
setInterval(() => {}, 1 << 30);
