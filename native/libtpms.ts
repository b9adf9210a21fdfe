// libtpms through koffi. libtpms keeps exactly one TPM in its globals, so every TPM we host gets its
// own private copy of the library's data. Two ways to get one:
//  - 'elf' (default): our loader (elf-loader.ts) maps the installed file's code and read-only data,
//    shared by all copies, plus a private relocated data segment and .bss per copy;
//  - 'copy': the .so copied to a fresh file (new inode), dlopen()ed under a unique name, file unlinked;
//    glibc then maps an independent copy of everything, code included (~0.6 MiB more per copy).
// Nothing outside native/ imports koffi: callers see numbers, Uint8Arrays and plain callbacks.
import './koffi-config.js';
import koffi from './koffi.js';
import type * as K from 'koffi';
import { randomBytes } from 'node:crypto';
import { copyFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ElfImage } from './elf-loader.js';

/** The Debian libtpms0 library; override with VTPM_LIBTPMS for another build. */
export const LIBTPMS_PATH = process.env['VTPM_LIBTPMS'] ?? '/usr/lib/x86_64-linux-gnu/libtpms.so.0';

export const TPM_SUCCESS = 0;
/** libtpms' "no such state yet" answer from the loaddata callback (TPM_BASE + TPM_NON_FATAL). */
export const TPM_RETRY = 0x800;
export const TPM_FAIL = 9;

export enum TpmVersionChoice {
  TPM12 = 0,
  TPM2 = 1,
}

/** enum TPMLIB_StateType */
export enum LibtpmsStateType {
  PERMANENT = 1,
  VOLATILE = 2,
  SAVE_STATE = 4,
}

/** enum TPMLIB_InfoFlags */
export enum LibtpmsInfoFlags {
  TPMSPECIFICATION = 1,
  TPMATTRIBUTES = 2,
}

/** What libtpms asks of its host. Names are the nvram "file" names: permall, volatilestate, savestate. */
export interface LibtpmsCallbacks {
  /** Return the stored blob, or null when there is none yet (libtpms then gets TPM_RETRY). */
  loadData(name: string): Uint8Array | null;
  /** Keep the blob; return a TPM_RESULT (0 = stored). Runs on the JS thread, so it must not block. */
  storeData(name: string, data: Uint8Array): number;
  deleteName(name: string, mustExist: boolean): number;
  /** The locality of the command being processed (0..4). */
  getLocality(): number;
}

// Prototypes of struct libtpms_callbacks (tpm_library.h).
const NvramInitCb = koffi.proto('uint32_t vtpm_nvram_init_cb(void)');
const NvramLoadCb = koffi.proto(
  'uint32_t vtpm_nvram_load_cb(void *data, void *length, uint32_t tpm_number, const char *name)',
);
const NvramStoreCb = koffi.proto(
  'uint32_t vtpm_nvram_store_cb(void *data, uint32_t length, uint32_t tpm_number, const char *name)',
);
const NvramDeleteCb = koffi.proto('uint32_t vtpm_nvram_delete_cb(uint32_t tpm_number, const char *name, uint8_t mustExist)');
const IoInitCb = koffi.proto('uint32_t vtpm_io_init_cb(void)');
const IoLocalityCb = koffi.proto('uint32_t vtpm_io_locality_cb(void *locality, uint32_t tpm_number)');
const IoPhysPresCb = koffi.proto('uint32_t vtpm_io_physpres_cb(void *pp, uint32_t tpm_number)');

const CallbacksStruct = koffi.struct('vtpm_libtpms_callbacks', {
  sizeOfStruct: 'int',
  tpm_nvram_init: koffi.pointer(NvramInitCb),
  tpm_nvram_loaddata: koffi.pointer(NvramLoadCb),
  tpm_nvram_storedata: koffi.pointer(NvramStoreCb),
  tpm_nvram_deletename: koffi.pointer(NvramDeleteCb),
  tpm_io_init: koffi.pointer(IoInitCb),
  tpm_io_getlocality: koffi.pointer(IoLocalityCb),
  tpm_io_getphysicalpresence: koffi.pointer(IoPhysPresCb),
});
const CALLBACKS_SIZE = koffi.sizeof(CallbacksStruct);

// The init and physical-presence callbacks carry no per-TPM state: one trampoline serves every copy.
// Koffi has 8192 callback slots per process; each TPM uses 4 of its own (load, store, delete,
// locality), which caps one process at ~2000 TPMs; more than that is a job for vTPM-domain processes.
const sharedNvInit = koffi.register(() => TPM_SUCCESS, koffi.pointer(NvramInitCb));
const sharedIoInit = koffi.register(() => TPM_SUCCESS, koffi.pointer(IoInitCb));
const sharedPhysPres = koffi.register((pp: unknown) => {
  // A virtual TPM has no physical-presence pin; report "not asserted".
  koffi.encode(pp, 'uint8_t', 0);
  return TPM_SUCCESS;
}, koffi.pointer(IoPhysPresCb));

const libc = koffi.load('libc.so.6');
const c_malloc = libc.func('void *malloc(size_t size)');

let copySeq = 0;

export class LibtpmsError extends Error {
  constructor(
    readonly call: string,
    readonly code: number,
  ) {
    super(`${call} returned TPM result 0x${code.toString(16)}`);
    this.name = 'LibtpmsError';
  }
}

type Fn = ((...args: unknown[]) => unknown) & { async: (...args: unknown[]) => void };

// The libtpms entry points: key -> [exported name, prototype with %s where the name goes].
const SIGNATURES: Record<string, [string, string]> = {
  ChooseTPMVersion: ['TPMLIB_ChooseTPMVersion', 'uint32_t %s(int ver)'],
  RegisterCallbacks: ['TPMLIB_RegisterCallbacks', 'uint32_t %s(vtpm_libtpms_callbacks *cbs)'],
  MainInit: ['TPMLIB_MainInit', 'uint32_t %s(void)'],
  Terminate: ['TPMLIB_Terminate', 'void %s(void)'],
  Process: [
    'TPMLIB_Process',
    'uint32_t %s(_Inout_ void **respbuffer, _Out_ uint32_t *resp_size, _Inout_ uint32_t *respbufsize, const uint8_t *command, uint32_t command_size)',
  ],
  // The same entry point with its out-parameters as raw memory we keep (no marshalling of arrays per call).
  ProcessRaw: ['TPMLIB_Process', 'uint32_t %s(void *respbuffer, void *resp_size, void *respbufsize, const uint8_t *command, uint32_t command_size)'],
  CancelCommand: ['TPMLIB_CancelCommand', 'uint32_t %s(void)'],
  GetState: ['TPMLIB_GetState', 'uint32_t %s(int st, _Out_ void **buffer, _Out_ uint32_t *buflen)'],
  SetState: ['TPMLIB_SetState', 'uint32_t %s(int st, const uint8_t *buffer, uint32_t buflen)'],
  VolatileAllStore: ['TPMLIB_VolatileAll_Store', 'uint32_t %s(_Out_ void **buffer, _Out_ uint32_t *buflen)'],
  SetBufferSize: ['TPMLIB_SetBufferSize', 'uint32_t %s(uint32_t wanted, _Out_ uint32_t *min, _Out_ uint32_t *max)'],
  GetInfo: ['TPMLIB_GetInfo', 'void *%s(int flags)'],
  GetVersion: ['TPMLIB_GetVersion', 'uint32_t %s(void)'],
  Free: ['TPM_Free', 'void %s(void *ptr)'],
};

// Function types for calling into ELF-loaded copies, declared once per process.
let protos: Record<string, K.IKoffiCType> | null = null;
function prototypes(): Record<string, K.IKoffiCType> {
  protos ??= Object.fromEntries(
    Object.entries(SIGNATURES).map(([key, [, sig]]) => [key, koffi.proto(sig.replace('%s', `vtpm_libtpms_${key}`))]),
  );
  return protos;
}

/** How private copies are made: 'elf' (shared code, default) or 'copy' (file copy + dlopen). */
export type LibtpmsLoader = 'elf' | 'copy';
export const DEFAULT_LOADER: LibtpmsLoader = process.env['VTPM_LIBTPMS_LOADER'] === 'copy' ? 'copy' : 'elf';

/**
 * One private, independently-stateful copy of libtpms. Not thread-safe by itself: the owner issues
 * one call at a time (async calls included) and never calls again before the previous one returned.
 */
export class Libtpms {
  readonly #fn: Record<string, Fn>;
  readonly #release: () => void;
  #registered: K.IKoffiRegisteredCallback[] = [];
  // libtpms reallocs the response buffer to TPM_BUFFER_MAX and keeps using what we hand back.
  #respBuf: unknown = null;
  #respBufSize = 0;
  // ProcessRaw's out-parameters, off the V8 heap (a GC during a callback must not move them): the
  // response buffer's address, the response size and the buffer size; and a view of the buffer, made
  // again only when libtpms moves it.
  readonly #cells = new ArrayBuffer(16);
  readonly #addr = new BigUint64Array(this.#cells, 0, 1);
  readonly #size = new Uint32Array(this.#cells, 8, 1);
  readonly #bufsize = new Uint32Array(this.#cells, 12, 1);
  #view: Uint8Array = new Uint8Array(0);
  #viewAddr = 0n;
  #unloaded = false;

  /** A new private copy made the default way (see DEFAULT_LOADER). */
  static load(loader: LibtpmsLoader = DEFAULT_LOADER, source = LIBTPMS_PATH): Libtpms {
    return loader === 'elf' ? Libtpms.loadShared(source) : Libtpms.loadPrivateCopy(source);
  }

  /**
   * Our own ELF loader maps the installed file's code and read-only data (page cache shared by every
   * copy) and gives this copy its own relocated data and .bss: ~0.6 MiB less per copy than a file copy.
   */
  static loadShared(source = LIBTPMS_PATH): Libtpms {
    const img = ElfImage.load(realpathSync(source));
    const p = prototypes();
    const fn: Record<string, Fn> = {};
    for (const [key, [name]] of Object.entries(SIGNATURES)) fn[key] = koffi.decode(img.symbol(name), p[key]!) as Fn;
    return new Libtpms(fn, () => img.unload());
  }

  /** Copy the .so to a fresh file (distinct inode, unique dlopen name) and dlopen it. */
  static loadPrivateCopy(source = LIBTPMS_PATH): Libtpms {
    // A unique name in the temp dir, unlinked right after dlopen: nothing is left behind, even on a crash
    // between the two only this one file.
    const path = join(tmpdir(), `vtpm-libtpms-${process.pid}-${++copySeq}-${randomBytes(4).toString('hex')}.so`);
    copyFileSync(source, path);
    try {
      const lib = koffi.load(path);
      const fn: Record<string, Fn> = {};
      for (const [key, [name, sig]] of Object.entries(SIGNATURES)) fn[key] = lib.func(sig.replace('%s', name)) as Fn;
      return new Libtpms(fn, () => lib.unload());
    } finally {
      // The mapping keeps the inode alive; the name is not needed after dlopen.
      rmSync(path, { force: true });
    }
  }

  private constructor(fn: Record<string, Fn>, release: () => void) {
    this.#fn = fn;
    this.#release = release;
  }

  version(): number {
    return this.#fn['GetVersion']!() as number;
  }

  chooseTPMVersion(v: TpmVersionChoice): number {
    return this.#fn['ChooseTPMVersion']!(v) as number;
  }

  /** Install this copy's callbacks. Calling again replaces them (and frees the old trampolines). */
  registerCallbacks(cbs: LibtpmsCallbacks): number {
    this.#unregister();
    const load = koffi.register((dataPP: unknown, lenP: unknown, _n: number, name: string) => {
      let blob: Uint8Array | null;
      try {
        blob = cbs.loadData(name);
      } catch {
        return TPM_FAIL;
      }
      if (!blob) return TPM_RETRY;
      // libtpms frees this buffer with free(); allocate with the same allocator.
      const p = c_malloc(Math.max(1, blob.length));
      if (!p) return TPM_FAIL;
      if (blob.length) new Uint8Array(koffi.view(p, blob.length) as ArrayBuffer).set(blob);
      koffi.encode(dataPP, 'void *', p);
      koffi.encode(lenP, 'uint32_t', blob.length);
      return TPM_SUCCESS;
    }, koffi.pointer(NvramLoadCb));
    const store = koffi.register((data: unknown, length: number, _n: number, name: string) => {
      const copy = new Uint8Array(length);
      if (length) copy.set(new Uint8Array(koffi.view(data, length) as ArrayBuffer));
      try {
        return cbs.storeData(name, copy);
      } catch {
        return TPM_FAIL;
      }
    }, koffi.pointer(NvramStoreCb));
    const del = koffi.register((_n: number, name: string, mustExist: number) => {
      try {
        return cbs.deleteName(name, mustExist !== 0);
      } catch {
        return TPM_FAIL;
      }
    }, koffi.pointer(NvramDeleteCb));
    const loc = koffi.register((locP: unknown) => {
      koffi.encode(locP, 'uint32_t', cbs.getLocality());
      return TPM_SUCCESS;
    }, koffi.pointer(IoLocalityCb));
    this.#registered = [load, store, del, loc];
    return this.#fn['RegisterCallbacks']!({
      sizeOfStruct: CALLBACKS_SIZE,
      tpm_nvram_init: sharedNvInit,
      tpm_nvram_loaddata: load,
      tpm_nvram_storedata: store,
      tpm_nvram_deletename: del,
      tpm_io_init: sharedIoInit,
      tpm_io_getlocality: loc,
      tpm_io_getphysicalpresence: sharedPhysPres,
    }) as number;
  }

  mainInit(): number {
    return this.#fn['MainInit']!() as number;
  }

  mainInitAsync(): Promise<number> {
    return callAsync<number>(this.#fn['MainInit']!, []);
  }

  terminate(): void {
    this.#fn['Terminate']!();
  }

  terminateAsync(): Promise<void> {
    return callAsync<void>(this.#fn['Terminate']!, []);
  }

  /** Run one command on this thread (blocks the event loop for its duration). */
  process(command: Uint8Array): { rc: number; response: Uint8Array } {
    this.#addr[0] = this.#viewAddr;
    this.#size[0] = 0;
    this.#bufsize[0] = this.#respBufSize;
    const rc = this.#fn['ProcessRaw']!(this.#addr, this.#size, this.#bufsize, command, command.length) as number;
    const addr = this.#addr[0]!;
    const size = this.#size[0]!;
    if (addr !== this.#viewAddr || this.#bufsize[0] !== this.#respBufSize) {
      // First call, or libtpms reallocated the buffer: take the new pointer and view it once.
      this.#respBuf = addr === 0n ? null : koffi.decode(this.#cells, 'void *');
      this.#respBufSize = this.#bufsize[0]!;
      this.#adopt();
    }
    if (size === 0 || addr === 0n) return { rc, response: new Uint8Array(0) };
    return { rc, response: this.#view.slice(0, Math.min(size, this.#view.length)) };
  }

  /** Views the response buffer #respBuf (the async path hands pointers back as objects). */
  #adopt(): void {
    const p = this.#respBuf;
    this.#viewAddr = p ? koffi.address(p) : 0n;
    this.#view = p && this.#respBufSize ? new Uint8Array(koffi.view(p, this.#respBufSize) as ArrayBuffer) : new Uint8Array(0);
  }

  /** Run one command on a libuv pool thread; callbacks are relayed to the JS thread by koffi. */
  async processAsync(command: Uint8Array): Promise<{ rc: number; response: Uint8Array }> {
    const out = [this.#respBuf];
    const size = [0];
    const bufsize = [this.#respBufSize];
    const rc = await callAsync<number>(this.#fn['Process']!, [out, size, bufsize, command, command.length]);
    return { rc, response: this.#takeResponse(out[0], size[0]!, bufsize[0]!) };
  }

  #takeResponse(buf: unknown, size: number, bufsize: number): Uint8Array {
    if ((buf ? koffi.address(buf) : 0n) !== this.#viewAddr || bufsize !== this.#respBufSize) {
      this.#respBuf = buf;
      this.#respBufSize = bufsize;
      this.#adopt();
    }
    if (!buf || size === 0) return new Uint8Array(0);
    return this.#view.slice(0, Math.min(size, this.#view.length));
  }

  /** Safe from any thread while a command runs: sets libtpms' cancel flag. */
  cancelCommand(): number {
    return this.#fn['CancelCommand']!() as number;
  }

  getState(st: LibtpmsStateType): { rc: number; blob: Uint8Array | null } {
    const out: unknown[] = [null];
    const len = [0];
    const rc = this.#fn['GetState']!(st, out, len) as number;
    return { rc, blob: this.#takeOwned(out[0], len[0]!) };
  }

  /** Only while powered off (before mainInit / after terminate); null clears the cached blob. */
  setState(st: LibtpmsStateType, blob: Uint8Array | null): number {
    return this.#fn['SetState']!(st, blob, blob ? blob.length : 0) as number;
  }

  volatileAllStore(): { rc: number; blob: Uint8Array | null } {
    const out: unknown[] = [null];
    const len = [0];
    const rc = this.#fn['VolatileAllStore']!(out, len) as number;
    return { rc, blob: this.#takeOwned(out[0], len[0]!) };
  }

  #takeOwned(p: unknown, len: number): Uint8Array | null {
    if (!p) return null;
    const copy = len ? new Uint8Array(koffi.view(p, len) as ArrayBuffer).slice() : new Uint8Array(0);
    this.#fn['Free']!(p);
    return copy;
  }

  /** wanted 0 queries; returns the size in effect and the allowed range. */
  setBufferSize(wanted: number): { size: number; min: number; max: number } {
    const min = [0];
    const max = [0];
    const size = this.#fn['SetBufferSize']!(wanted, min, max) as number;
    return { size, min: min[0]!, max: max[0]! };
  }

  getInfo(flags: LibtpmsInfoFlags): string {
    const p = this.#fn['GetInfo']!(flags);
    if (!p) return '';
    const s = koffi.decode(p, 'char', -1) as string;
    this.#fn['Free']!(p);
    return s;
  }

  #unregister(): void {
    for (const r of this.#registered) koffi.unregister(r);
    this.#registered = [];
  }

  /** Free the response buffer and callback slots and dlclose the copy. The object is dead after. */
  unload(): void {
    if (this.#unloaded) return;
    this.#unloaded = true;
    if (this.#respBuf) this.#fn['Free']!(this.#respBuf);
    this.#respBuf = null;
    this.#view = new Uint8Array(0);
    this.#viewAddr = 0n;
    this.#unregister();
    this.#release();
  }
}

function callAsync<T>(fn: Fn, args: unknown[]): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    fn.async(...args, (err: unknown, res: T) => (err ? reject(err) : resolve(res)));
  });
}
