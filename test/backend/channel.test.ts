// openChannel: the one Channel interface the backend's device dispatches through, for either
// transport, against the real frontends and a real swtpm answering the commands.
import { describe, expect, it } from 'vitest';
import { useDom0Swtpm } from '../helpers/dom0-swtpm.js';
import { getRandom } from '../../src/tpm/tpm2-commands.js';
import { responseCode as rc } from '../../src/tpm/wire.js';
import { Domain } from '../../src/xen/index.js';
import { openChannel } from '../../src/backend/channel.js';
import { V2Channel } from '../../src/backend/v2-channel.js';
import { RingChannel } from '../../src/backend/ring-channel.js';
import { V2Front } from '../../src/frontend/v2-front.js';
import { RingFront } from '../../src/tpmif/ring-front.js';
import type { TpmTransport } from '../../src/tpmif/transport.js';

const fx = useDom0Swtpm();
const { dir } = fx;
let nextDomid = 40;


describe('openChannel', () => {
  for (const protocol of ['v2', 'ring'] as const) {
    it(`opens the ${protocol} backend for a ${protocol} frontend and serves it through the Channel interface`, async () => {
      const g = await Domain.create({ domid: nextDomid++, dir });
      const front: TpmTransport = protocol === 'ring' ? new RingFront(g, 0) : new V2Front(g, 0);
      const fatal: string[] = [];
      const ch = openChannel(fx.dom0, protocol, {
        frontDomid: g.domid,
        refs: [...front.refs],
        port: front.port,
        target: { execute: (cmd) => fx.client.transmit(cmd), cancel: () => {} },
        onFatal: (r) => fatal.push(r),
      });
      expect(ch.protocol).toBe(protocol);
      expect(ch).toBeInstanceOf(protocol === 'ring' ? RingChannel : V2Channel);
      expect(ch.frontDomid).toBe(g.domid);
      const rsp = await front.transmit(getRandom(8));
      expect(rc(rsp)).toBe(0);
      await ch.drain();
      expect(ch.commands).toBe(1);
      expect(fatal).toEqual([]);
      ch.close();
      await front.close();
      await g.destroy();
    });
  }
});
