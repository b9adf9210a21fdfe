// Protocol violations a guest can commit against its backend, for fault-injection tests and for
// people studying how a backend defends itself: each is what a buggy or malicious frontend driver
// could really do with the memory and event channel it owns.
import type { Domain } from '../xen/index.js';
import { encodeV2Request, setV2State, TPMIF_STATE_SUBMIT } from '../xen/tpmif.js';
import type { TpmFront } from './tpmfront.js';

export const MISBEHAVIOURS = ['garbage-indices', 'oversize', 'revoke', 'flood', 'die-mid-command'] as const;
export type Misbehaviour = (typeof MISBEHAVIOURS)[number];

/** TPM2_CreatePrimary of an RSA-3072 storage key under the owner hierarchy: hundreds of ms of work. */
function createPrimaryRsa3072(): Uint8Array {
  const pub = Buffer.concat([
    Buffer.from([0x00, 0x01, 0x00, 0x0b]), // type RSA, nameAlg SHA-256
    Buffer.from([0x00, 0x03, 0x00, 0x72]), // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
    Buffer.from([0x00, 0x00]), // authPolicy empty
    Buffer.from([0x00, 0x06, 0x00, 0x80, 0x00, 0x43]), // symmetric AES-128-CFB
    Buffer.from([0x00, 0x10]), // scheme NULL
    Buffer.from([0x0c, 0x00]), // keyBits 3072
    Buffer.from([0x00, 0x00, 0x00, 0x00]), // exponent default
    Buffer.from([0x00, 0x00]), // unique empty
  ]);
  const body = Buffer.concat([
    Buffer.from([0x40, 0x00, 0x00, 0x01]), // TPM_RH_OWNER
    Buffer.from([0x00, 0x00, 0x00, 0x09, 0x40, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00]), // password session
    Buffer.from([0x00, 0x04, 0x00, 0x00, 0x00, 0x00]), // inSensitive: empty auth, empty data
    Buffer.from([pub.length >> 8, pub.length & 0xff]),
    pub,
    Buffer.from([0x00, 0x00]), // outsideInfo
    Buffer.from([0x00, 0x00, 0x00, 0x00]), // creationPCR: none
  ]);
  const h = Buffer.alloc(10);
  h.writeUInt16BE(0x8002, 0);
  h.writeUInt32BE(10 + body.length, 2);
  h.writeUInt32BE(0x131, 6);
  return new Uint8Array(Buffer.concat([h, body]));
}

const GET_RANDOM_8 = new Uint8Array([0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8]);

/** Commit one violation; returns a line for the guest's log saying what was done. */
export async function misbehave(front: TpmFront, dom: Domain, how: Misbehaviour): Promise<string> {
  const t = front.transport;
  const page = t.sharedPage;
  switch (how) {
    case 'garbage-indices': {
      // Claim 100 000 requests on a ring that holds a few dozen.
      const idx = new Uint32Array(page.buffer, page.byteOffset, 4);
      Atomics.store(idx, 0, (Atomics.load(idx, 2) + 100_000) >>> 0);
      dom.evtchn.send(t.port);
      return 'wrote req_prod 100000 past rsp_prod';
    }
    case 'oversize': {
      // A v2 request whose length runs past the page.
      encodeV2Request(page, 5000, 0);
      setV2State(page, TPMIF_STATE_SUBMIT);
      dom.evtchn.send(t.port);
      return 'submitted length 5000 on a 4096-byte page';
    }
    case 'revoke': {
      // Take the ring page back while the backend has it mapped: Xen refuses, and so do we.
      const ok = dom.grants.endAccess(t.refs[0]!);
      const rsp = await front.transmit(GET_RANDOM_8);
      return `end_access of ring-ref ${t.refs[0]} while mapped: ${ok ? 'SUCCEEDED (wrong)' : 'refused'}; device still answers (${rsp.length} bytes)`;
    }
    case 'flood': {
      // As many commands as the transport takes, for two seconds.
      const until = Date.now() + 2000;
      let n = 0;
      const workers = Array.from({ length: 64 }, async () => {
        while (Date.now() < until) {
          await front.transmit(GET_RANDOM_8);
          n++;
        }
      });
      await Promise.all(workers);
      return `flooded: ${n} commands answered in 2 s`;
    }
    case 'die-mid-command': {
      void front.transmit(createPrimaryRsa3072()).catch(() => {});
      // Give the request time to reach the backend, then die without closing anything.
      setTimeout(() => process.kill(process.pid, 'SIGKILL'), 30);
      return 'sent an RSA-3072 CreatePrimary and is about to die';
    }
  }
}
