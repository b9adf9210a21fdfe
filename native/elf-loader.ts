// A minimal loader for one more private instance of an x86-64 ELF shared object, so that many copies of
// libtpms share their code but not their globals.
//
// Why not dlopen: glibc hands back the already-loaded object for a file with the same device/inode, so
// independent globals need a copy of the file (new inode), and a new inode means new page-cache pages:
// every copy then owns its ~620 KiB of text and read-only data. This loader maps the read-only and
// executable segments MAP_PRIVATE from the one installed file (page cache shared by every copy, and by
// swtpm processes), and gives each copy its own writable segment and .bss, relocated by us.
//
// Scope, checked on load (anything else is refused, never half-loaded): ELF64 little-endian x86-64
// ET_DYN; no PT_TLS; relocations R_X86_64_RELATIVE, _64, _GLOB_DAT, _JUMP_SLOT, all landing in writable
// segments. Symbols the object defines bind to this copy (so its globals stay private); the rest come
// from the process (dlsym RTLD_DEFAULT, as ld.so's global scope would) or the object's DT_NEEDED
// libraries. DT_INIT and DT_INIT_ARRAY run after relocation, as ld.so runs them.
import './koffi-config.js';
import koffi from './koffi.js';
import { closeSync, openSync, readFileSync } from 'node:fs';

const PAGE = 4096;
const PROT_NONE = 0;
const PROT_READ = 1;
const PROT_WRITE = 2;
const PROT_EXEC = 4;
const MAP_PRIVATE = 0x02;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const RTLD_NOW = 2;

const PT_LOAD = 1;
const PT_DYNAMIC = 2;
const PT_TLS = 7;
const PT_GNU_RELRO = 0x6474e552;
const DT_NULL = 0;
const DT_NEEDED = 1;
const DT_PLTRELSZ = 2;
const DT_STRTAB = 5;
const DT_SYMTAB = 6;
const DT_RELA = 7;
const DT_RELASZ = 8;
const DT_INIT = 12;
const DT_JMPREL = 23;
const DT_INIT_ARRAY = 25;
const DT_INIT_ARRAYSZ = 27;
const R_X86_64_64 = 1;
const R_X86_64_GLOB_DAT = 6;
const R_X86_64_JUMP_SLOT = 7;
const R_X86_64_RELATIVE = 8;
const STB_WEAK = 2;

const libc = koffi.load('libc.so.6');
const c_mmap = libc.func('uint64_t mmap(uint64_t addr, size_t length, int prot, int flags, int fd, int64_t offset)');
const c_munmap = libc.func('int munmap(uint64_t addr, size_t length)');
const c_mprotect = libc.func('int mprotect(uint64_t addr, size_t length, int prot)');
const c_dlopen = libc.func('void *dlopen(const char *file, int mode)');
const c_dlsym = libc.func('uint64_t dlsym(void *handle, const char *name)');
const c_memset = libc.func('void *memset(uint64_t s, int c, size_t n)');
const VoidFn = koffi.proto('void vtpm_elf_init_fn(void)');

export class ElfLoadError extends Error {
  constructor(
    readonly path: string,
    message: string,
  ) {
    super(`ELF loader: ${path}: ${message}`);
    this.name = 'ElfLoadError';
  }
}

interface Segment {
  vaddr: number;
  offset: number;
  filesz: number;
  memsz: number;
  prot: number;
}

interface Reloc {
  offset: number;
  type: number;
  sym: number;
  addend: bigint;
}

/** What every copy of one file shares: the parse, the open fd, and the resolved imports. */
interface Parsed {
  path: string;
  fd: number;
  span: number;
  segments: Segment[];
  relro: { start: number; end: number } | null;
  relocs: Reloc[];
  /** Symbol index -> offset within the image (defined symbols). */
  defined: Map<number, number>;
  /** Symbol index -> absolute address (imports, resolved once per process). */
  imported: Map<number, number>;
  exports: Map<string, number>;
  /** DT_INIT offset, then the INIT_ARRAY slots (offsets; their contents are relocated per copy). */
  init: number | undefined;
  initArray: { offset: number; count: number } | undefined;
}

const parsedCache = new Map<string, Parsed>();

function pageDown(x: number): number {
  return Math.floor(x / PAGE) * PAGE;
}

function pageUp(x: number): number {
  return Math.ceil(x / PAGE) * PAGE;
}

function parse(path: string): Parsed {
  const cached = parsedCache.get(path);
  if (cached) return cached;
  const f = readFileSync(path);
  const fail = (m: string): never => {
    throw new ElfLoadError(path, m);
  };
  if (f.readUInt32BE(0) !== 0x7f454c46) fail('not an ELF file');
  if (f[4] !== 2 || f[5] !== 1) fail('not ELF64 little-endian');
  if (f.readUInt16LE(16) !== 3) fail('not a shared object (ET_DYN)');
  if (f.readUInt16LE(18) !== 62) fail('not x86-64');
  const phoff = Number(f.readBigUInt64LE(32));
  const phentsize = f.readUInt16LE(54);
  const phnum = f.readUInt16LE(56);
  const segments: Segment[] = [];
  let dynamic = -1;
  let relro: Parsed['relro'] = null;
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    const type = f.readUInt32LE(o);
    const flags = f.readUInt32LE(o + 4);
    const offset = Number(f.readBigUInt64LE(o + 8));
    const vaddr = Number(f.readBigUInt64LE(o + 16));
    const filesz = Number(f.readBigUInt64LE(o + 32));
    const memsz = Number(f.readBigUInt64LE(o + 40));
    if (type === PT_TLS) fail('thread-local storage is not supported');
    if (type === PT_LOAD) {
      if (offset % PAGE !== vaddr % PAGE) fail('segment offset and address disagree modulo the page size');
      const prot = (flags & 4 ? PROT_READ : 0) | (flags & 2 ? PROT_WRITE : 0) | (flags & 1 ? PROT_EXEC : 0);
      segments.push({ vaddr, offset, filesz, memsz, prot });
    } else if (type === PT_DYNAMIC) dynamic = offset;
    else if (type === PT_GNU_RELRO) relro = { start: pageDown(vaddr), end: pageDown(vaddr + memsz) };
  }
  if (segments.length === 0 || dynamic < 0) fail('no PT_LOAD or PT_DYNAMIC');
  const span = pageUp(Math.max(...segments.map((s) => s.vaddr + s.memsz)));
  // Virtual address -> file offset, through the segment that holds it.
  const fileOff = (va: number): number => {
    const s = segments.find((g) => va >= g.vaddr && va < g.vaddr + g.filesz);
    if (!s) return fail(`address 0x${va.toString(16)} is not backed by the file`);
    return s.offset + (va - s.vaddr);
  };
  const dyn = new Map<number, number[]>();
  for (let o = dynamic; ; o += 16) {
    const tag = Number(f.readBigInt64LE(o));
    if (tag === DT_NULL) break;
    const list = dyn.get(tag) ?? [];
    list.push(Number(f.readBigUInt64LE(o + 8)));
    dyn.set(tag, list);
  }
  const one = (tag: number): number | undefined => dyn.get(tag)?.[0];
  const strtab = fileOff(one(DT_STRTAB) ?? fail('no DT_STRTAB'));
  const symtab = fileOff(one(DT_SYMTAB) ?? fail('no DT_SYMTAB'));
  const str = (o: number): string => {
    const end = f.indexOf(0, strtab + o);
    return f.toString('latin1', strtab + o, end);
  };
  // The dynamic symbol count comes from the .dynsym section header (GNU hash tables do not give it).
  const shoff = Number(f.readBigUInt64LE(40));
  const shentsize = f.readUInt16LE(58);
  const shnum = f.readUInt16LE(60);
  let nsyms = 0;
  for (let i = 0; i < shnum; i++) {
    const o = shoff + i * shentsize;
    if (f.readUInt32LE(o + 4) === 11 /* SHT_DYNSYM */) nsyms = Number(f.readBigUInt64LE(o + 32)) / 24;
  }
  if (nsyms === 0) fail('no .dynsym section');
  const defined = new Map<number, number>();
  const exports = new Map<string, number>();
  const undefinedSyms = new Map<number, { name: string; weak: boolean }>();
  for (let i = 1; i < nsyms; i++) {
    const o = symtab + i * 24;
    const name = str(f.readUInt32LE(o));
    const info = f[o + 4]!;
    const shndx = f.readUInt16LE(o + 6);
    const value = Number(f.readBigUInt64LE(o + 8));
    if (shndx !== 0) {
      defined.set(i, value);
      if (name) exports.set(name.split('@')[0]!, value);
    } else undefinedSyms.set(i, { name, weak: info >> 4 === STB_WEAK });
  }
  const relocs: Reloc[] = [];
  const readRela = (addr: number | undefined, size: number | undefined): void => {
    if (addr === undefined || !size) return;
    const start = fileOff(addr);
    for (let o = start; o < start + size; o += 24) {
      const info = f.readBigUInt64LE(o + 8);
      relocs.push({
        offset: Number(f.readBigUInt64LE(o)),
        type: Number(info & 0xffffffffn),
        sym: Number(info >> 32n),
        addend: f.readBigInt64LE(o + 16),
      });
    }
  };
  readRela(one(DT_RELA), one(DT_RELASZ));
  readRela(one(DT_JMPREL), one(DT_PLTRELSZ));
  const writable = (off: number): boolean =>
    segments.some((s) => s.prot & PROT_WRITE && off >= s.vaddr && off + 8 <= s.vaddr + s.memsz);
  for (const r of relocs) {
    if (![R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_RELATIVE].includes(r.type)) {
      fail(`relocation type ${r.type} is not supported`);
    }
    if (!writable(r.offset)) fail(`relocation at 0x${r.offset.toString(16)} is outside the writable segment`);
  }
  // Imports: the process's global scope first (what ld.so searches first), then DT_NEEDED libraries.
  const needed = (dyn.get(DT_NEEDED) ?? []).map((o) => c_dlopen(str(o), RTLD_NOW));
  const imported = new Map<number, number>();
  for (const r of relocs) {
    if (r.sym === 0 || defined.has(r.sym) || imported.has(r.sym)) continue;
    const u = undefinedSyms.get(r.sym);
    if (!u) fail(`relocation names unknown symbol ${r.sym}`);
    let addr = Number(c_dlsym(null, u!.name));
    for (const h of needed) if (!addr && h) addr = Number(c_dlsym(h, u!.name));
    if (!addr && !u!.weak) fail(`unresolved symbol ${u!.name}`);
    imported.set(r.sym, addr);
  }
  const initArrayAt = one(DT_INIT_ARRAY);
  const p: Parsed = {
    path,
    fd: openSync(path, 'r'),
    span,
    segments,
    relro,
    relocs,
    defined,
    imported,
    exports,
    init: one(DT_INIT),
    initArray: initArrayAt === undefined ? undefined : { offset: initArrayAt, count: (one(DT_INIT_ARRAYSZ) ?? 0) / 8 },
  };
  parsedCache.set(path, p);
  return p;
}

function pointer(addr: number): unknown {
  return koffi.decode(BigUint64Array.of(BigInt(addr)), 'void *');
}

/** One loaded private instance of a shared object. */
export class ElfImage {
  readonly path: string;
  readonly base: number;
  readonly #p: Parsed;
  #mapped = true;

  private constructor(p: Parsed, base: number) {
    this.path = p.path;
    this.#p = p;
    this.base = base;
  }

  static load(path: string): ElfImage {
    const p = parse(path);
    // Reserve the whole span first so the segments keep their relative layout.
    const base = Number(c_mmap(0, p.span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base <= 0 || base >= 2 ** 64 - PAGE) throw new ElfLoadError(path, 'mmap reserve failed');
    const img = new ElfImage(p, base);
    try {
      img.#map();
      img.#relocate();
      img.#protectAndInit();
    } catch (err) {
      c_munmap(base, p.span);
      img.#mapped = false;
      throw err;
    }
    return img;
  }

  #map(): void {
    const p = this.#p;
    for (const s of p.segments) {
      const start = pageDown(s.vaddr);
      const fileEnd = s.vaddr + s.filesz;
      const memEnd = pageUp(s.vaddr + s.memsz);
      const mapLen = pageUp(fileEnd) - start;
      // Relocations only land in writable segments (checked in parse), so final protections are fine.
      if (mapLen > 0) {
        const r = Number(c_mmap(this.base + start, mapLen, s.prot, MAP_PRIVATE | MAP_FIXED, p.fd, pageDown(s.offset)));
        if (r !== this.base + start) throw new ElfLoadError(p.path, `mmap of segment at 0x${start.toString(16)} failed`);
      }
      if (s.memsz > s.filesz) {
        // .bss: zero the tail of the last file page, then anonymous zero pages for the rest.
        const tailEnd = Math.min(pageUp(fileEnd), memEnd);
        if (tailEnd > fileEnd) c_memset(this.base + fileEnd, 0, tailEnd - fileEnd);
        if (memEnd > pageUp(fileEnd)) {
          const at = this.base + pageUp(fileEnd);
          const r = Number(c_mmap(at, memEnd - pageUp(fileEnd), s.prot, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS, -1, 0));
          if (r !== at) throw new ElfLoadError(p.path, 'mmap of .bss failed');
        }
      }
    }
  }

  #relocate(): void {
    const p = this.#p;
    const view = new DataView(koffi.view(pointer(this.base), p.span) as ArrayBuffer);
    const base = BigInt(this.base);
    for (const r of p.relocs) {
      let value: bigint;
      if (r.type === R_X86_64_RELATIVE) value = base + r.addend;
      else {
        const own = p.defined.get(r.sym);
        const s = own !== undefined ? base + BigInt(own) : BigInt(p.imported.get(r.sym) ?? 0);
        value = r.type === R_X86_64_64 ? s + r.addend : s;
      }
      view.setBigUint64(r.offset, BigInt.asUintN(64, value), true);
    }
  }

  #protectAndInit(): void {
    const p = this.#p;
    if (p.relro && p.relro.end > p.relro.start) c_mprotect(this.base + p.relro.start, p.relro.end - p.relro.start, PROT_READ);
    const view = new DataView(koffi.view(pointer(this.base), p.span) as ArrayBuffer);
    const run = (addr: number): void => {
      if (addr !== 0 && addr !== this.base) (koffi.decode(pointer(addr), VoidFn) as () => void)();
    };
    if (p.init !== undefined) run(this.base + p.init);
    // INIT_ARRAY slots hold absolute addresses once relocated (RELATIVE relocations of this copy).
    for (let k = 0; k < (p.initArray?.count ?? 0); k++) run(Number(view.getBigUint64(p.initArray!.offset + 8 * k, true)));
  }

  /** Address of an exported symbol of this copy. */
  address(name: string): number {
    const off = this.#p.exports.get(name);
    if (off === undefined) throw new ElfLoadError(this.path, `no exported symbol ${name}`);
    return this.base + off;
  }

  /** A koffi pointer to an exported symbol of this copy (e.g. to decode as a function). */
  symbol(name: string): unknown {
    return pointer(this.address(name));
  }

  /** Unmap the copy. Nothing may call into it afterwards. */
  unload(): void {
    if (!this.#mapped) return;
    this.#mapped = false;
    c_munmap(this.base, this.#p.span);
  }
}

/** Close the shared file descriptors (tests; normally they live as long as the process). */
export function closeElfFiles(): void {
  for (const p of parsedCache.values()) closeSync(p.fd);
  parsedCache.clear();
}
