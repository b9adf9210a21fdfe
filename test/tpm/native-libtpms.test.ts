// The two ways of making a private libtpms: our ELF loader (shared code, private data) and a dlopen()ed
// file copy. Copies made either way are independent TPMs in one process.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ElfImage, ElfLoadError } from '../../native/elf-loader.js';
import { Libtpms, LibtpmsStateType, TpmVersionChoice } from '../../native/libtpms.js';
import * as tpm2 from '../../src/tpm/tpm2-commands.js';
import { hex } from './helpers.js';
import { scratchDir } from '../helpers/temp.js';

function boot(lib: Libtpms): Map<string, Uint8Array> {
  const nv = new Map<string, Uint8Array>();
  expect(lib.chooseTPMVersion(TpmVersionChoice.TPM2)).toBe(0);
  lib.registerCallbacks({
    loadData: (n) => nv.get(n) ?? null,
    storeData: (n, d) => (nv.set(n, d), 0),
    deleteName: (n) => (nv.delete(n), 0),
    getLocality: () => 0,
  });
  expect(lib.mainInit()).toBe(0);
  expect(hex(lib.process(tpm2.startup()).response)).toBe('80010000000a00000000');
  return nv;
}

describe('private libtpms copies', () => {
  it('ELF-loaded and file-copy instances coexist, each with its own manufactured state', async () => {
    const a = Libtpms.load('elf');
    const b = Libtpms.load('elf');
    const c = Libtpms.load('copy');
    const nvs = [a, b, c].map(boot);
    expect(a.version()).toBe(0x000902);
    const perms = nvs.map((nv) => hex(nv.get('permall')!));
    expect(new Set(perms).size).toBe(3);
    // A PCR extended in one copy stays zero in the others.
    a.process(tpm2.pcrExtendSha256(16, new Uint8Array(32).fill(1)));
    const pcr = (l: Libtpms) => hex(tpm2.parsePcrRead(l.process(tpm2.pcrReadSha256(16)).response));
    expect(pcr(a)).not.toBe('00'.repeat(32));
    expect(pcr(b)).toBe('00'.repeat(32));
    expect(pcr(c)).toBe('00'.repeat(32));
    // Async calls run on the pool and give the same kind of answer.
    const r = await b.processAsync(tpm2.getRandom(8));
    expect(tpm2.parseGetRandom(r.response)).toHaveLength(8);
    expect(b.getState(LibtpmsStateType.PERMANENT).blob).not.toBeNull();
    expect(JSON.parse(a.getInfo(1))).toMatchObject({ TPMSpecification: { family: '2.0' } });
    for (const l of [a, b, c]) {
      l.terminate();
      l.unload();
    }
  });

  it('answers are copies: later calls, sync or on the pool, never change an answer already taken', async () => {
    // process() reads the response through one view of libtpms' response buffer, kept while the
    // buffer stays where it is; processAsync() gets the buffer back as a pointer object.
    const lib = Libtpms.load('elf');
    boot(lib);
    const answers: Array<{ bytes: Uint8Array; hex: string }> = [];
    const take = (r: { rc: number; response: Uint8Array }): void => {
      expect(r.rc).toBe(0);
      answers.push({ bytes: r.response, hex: hex(r.response) });
    };
    for (let i = 0; i < 20; i++) {
      take(lib.process(tpm2.getRandom(32)));
      take(await lib.processAsync(tpm2.getRandom(16)));
      take(lib.process(tpm2.pcrExtendSha256(16, new Uint8Array(32).fill(i))));
    }
    const pcr = tpm2.parsePcrRead(lib.process(tpm2.pcrReadSha256(16)).response);
    expect(hex(pcr)).not.toBe('00'.repeat(32));
    // Every answer kept its own bytes and length, and the random ones all differ.
    for (const a of answers) expect(hex(a.bytes)).toBe(a.hex);
    expect(new Set(answers.filter((a) => a.bytes.length > 19).map((a) => a.hex)).size).toBe(40);
    expect(answers.filter((a) => a.bytes.length === 19)).toHaveLength(20);
    lib.terminate();
    lib.unload();
  });

  it('the ELF loader refuses what it cannot load, precisely', () => {
    const t = scratchDir('elf');
    const f = join(t.dir, 'not-elf.so');
    writeFileSync(f, 'hello, this is not an ELF object');
    expect(() => ElfImage.load(f)).toThrow(ElfLoadError);
    expect(() => ElfImage.load(f)).toThrow(/not an ELF file/);
    t.cleanup();
  });
});
