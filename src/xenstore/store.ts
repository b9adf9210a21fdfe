// The XenStore tree and its transactions. Nodes are immutable and updated by path copying, so a
// transaction's snapshot is just the root it started from. Every node carries the generation at which
// it (its value, perms or child list) last changed; a transaction remembers the generation of every
// node it touched, and commits only if all of them are unchanged in the live tree (else EAGAIN), by
// replaying its operations onto the live tree. Quotas (docs/protocols/xs-wire.md) apply to unprivileged callers.
import { XsError, type XsErrno } from './wire.js';
import { canRead, canWrite, type Perm } from './permissions.js';

/** Who is asking: the domain a connection belongs to (decided by its socket) and whether it is dom0. */
export interface Caller {
  readonly domid: number;
  readonly privileged: boolean;
}

/** Per-domain limits of C xenstored (defaults; dom0 is exempt). */
export interface Quotas {
  nodes: number;
  watches: number;
  transactions: number;
  outstanding: number;
  nodesPerTransaction: number;
  permsPerNode: number;
  pathLength: number;
  nodeSize: number;
  /** Bytes of node names, values and permissions a domain owns (C xenstored's hard memory quota). */
  memory: number;
}

export const DEFAULT_QUOTAS: Readonly<Quotas> = {
  nodes: 1000,
  watches: 128,
  transactions: 10,
  outstanding: 20,
  nodesPerTransaction: 1024,
  permsPerNode: 5,
  pathLength: 2048,
  nodeSize: 2048,
  memory: 2.5 * 1024 * 1024,
};

interface Node {
  readonly value: Buffer;
  readonly perms: readonly Perm[];
  readonly children: ReadonlyMap<string, Node>;
  readonly gen: number;
}

/** A modification of the live tree, for watches: `perms` are the node's (before removal, if removed). */
export interface Change {
  readonly path: string;
  readonly removed: boolean;
  readonly perms: readonly Perm[];
  /** Before a SET_PERMS: a domain that could read the node under either set is told. */
  readonly oldPerms?: readonly Perm[];
}

type Op =
  | { kind: 'write'; path: string; value: Buffer }
  | { kind: 'mkdir'; path: string }
  | { kind: 'rm'; path: string }
  | { kind: 'setperms'; path: string; perms: Perm[] };

/** An open transaction: a private tree plus what it touched and did. */
export class Transaction {
  /** Generation of every node the transaction touched, as first seen (-1: absent). */
  readonly accessed = new Map<string, number>();
  readonly ops: Array<{ caller: Caller; op: Op }> = [];
  constructor(
    readonly id: number,
    readonly caller: Caller,
    public tree: Tree,
  ) {}
}

const EMPTY = Buffer.alloc(0);

function segmentsOf(path: string): string[] {
  return path === '/' ? [] : path.slice(1).split('/');
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

function fail(code: XsErrno, why: string): never {
  throw new XsError(code, `${code}: ${why}`);
}

/** What a node costs its owner: its name, value and permission entries (8 bytes each, as in C). */
function nodeBytes(path: string, value: Buffer, perms: readonly Perm[]): number {
  return path.length - path.lastIndexOf('/') - 1 + value.length + 8 * perms.length;
}

/** A root and its per-owner usage; cloning is O(domains), so every operation works on a copy. */
class Tree {
  constructor(
    public root: Node,
    readonly owned: Map<number, number>,
    readonly bytes: Map<number, number>,
  ) {}

  clone(): Tree {
    return new Tree(this.root, new Map(this.owned), new Map(this.bytes));
  }

  get(path: string): Node | undefined {
    let n: Node | undefined = this.root;
    for (const s of segmentsOf(path)) {
      n = n.children.get(s);
      if (!n) return undefined;
    }
    return n;
  }

  /** Replace (or with undefined, remove) the node at `path`; its parent must exist. */
  put(path: string, node: Node | undefined, gen: number): void {
    const segs = segmentsOf(path);
    if (segs.length === 0) {
      if (!node) fail('EINVAL', 'cannot remove /');
      this.root = node;
      return;
    }
    this.root = this.putAt(this.root, segs, 0, node, gen);
  }

  private putAt(at: Node, segs: string[], i: number, leaf: Node | undefined, gen: number): Node {
    const name = segs[i]!;
    const children = new Map(at.children);
    let listChanged = false;
    if (i === segs.length - 1) {
      listChanged = leaf === undefined ? children.delete(name) : !children.has(name);
      if (leaf) children.set(name, leaf);
    } else {
      const child = at.children.get(name);
      if (!child) fail('ENOENT', `/${segs.slice(0, i + 1).join('/')} missing`);
      children.set(name, this.putAt(child, segs, i + 1, leaf, gen));
    }
    return { value: at.value, perms: at.perms, children, gen: listChanged ? gen : at.gen };
  }

  /** Charge (or with negative numbers, refund) `domid` for nodes and bytes. */
  account(domid: number, nodes: number, bytes: number): void {
    const n = (this.owned.get(domid) ?? 0) + nodes;
    if (n === 0) this.owned.delete(domid);
    else this.owned.set(domid, n);
    const b = (this.bytes.get(domid) ?? 0) + bytes;
    if (b === 0) this.bytes.delete(domid);
    else this.bytes.set(domid, b);
  }
}

/** Every node of a subtree, parents before children, with absolute paths. */
function* walk(path: string, node: Node): Generator<[string, Node]> {
  yield [path, node];
  for (const [name, child] of node.children) yield* walk(path === '/' ? `/${name}` : `${path}/${name}`, child);
}

export class Store {
  private main: Tree;
  private gen = 1;
  private nextTxId = 1;
  private readonly txs = new Map<number, Transaction>();
  /** Called with the changes of every successful modification of the live tree. */
  onChange: (changes: Change[]) => void = () => {};

  constructor(readonly quotas: Quotas = { ...DEFAULT_QUOTAS }) {
    const perms: Perm[] = [{ domid: 0, access: 'n' }];
    const leaf = (children: Map<string, Node>): Node => ({ value: EMPTY, perms, children, gen: 0 });
    const root = leaf(new Map([['local', leaf(new Map([['domain', leaf(new Map())]]))]]));
    const owned = new Map([[0, 3]]);
    const bytes = new Map([[0, nodeBytes('/local', EMPTY, perms) + nodeBytes('/local/domain', EMPTY, perms) + 8]]);
    this.main = new Tree(root, owned, bytes);
  }

  // ---- reads --------------------------------------------------------------------------------------

  read(caller: Caller, path: string, tx?: Transaction): Buffer {
    return this.readable(caller, path, tx).value;
  }

  directory(caller: Caller, path: string, tx?: Transaction): string[] {
    return [...this.readable(caller, path, tx).children.keys()];
  }

  /** Generation of the node (changes with its child list) and its children, for DIRECTORY_PART. */
  directoryWithGen(caller: Caller, path: string, tx?: Transaction): { gen: number; children: string[] } {
    const n = this.readable(caller, path, tx);
    return { gen: n.gen, children: [...n.children.keys()] };
  }

  getPerms(caller: Caller, path: string, tx?: Transaction): readonly Perm[] {
    return this.readable(caller, path, tx).perms;
  }

  /** Whether `domid` could read `path` now (watch events are only sent to readers). */
  canSee(domid: number, perms: readonly Perm[]): boolean {
    return domid === 0 || canRead(perms, domid);
  }

  private readable(caller: Caller, path: string, tx?: Transaction): Node {
    const tree = tx ? tx.tree : this.main;
    const n = tree.get(path);
    if (tx) this.touch(tx, path, n);
    if (!n) this.missing(tree, caller, path);
    if (!caller.privileged && !canRead(n.perms, caller.domid)) fail('EACCES', `dom${caller.domid} may not read ${path}`);
    return n;
  }

  /** ENOENT, or EACCES when the nearest existing ancestor is unreadable (do not leak existence). */
  private missing(tree: Tree, caller: Caller, path: string): never {
    let p = parentOf(path);
    let a = tree.get(p);
    while (!a) {
      p = parentOf(p);
      a = tree.get(p);
    }
    if (!caller.privileged && !canRead(a.perms, caller.domid)) fail('EACCES', `dom${caller.domid} may not read ${p}`);
    fail('ENOENT', `${path} does not exist`);
  }

  // ---- writes -------------------------------------------------------------------------------------

  write(caller: Caller, path: string, value: Buffer, tx?: Transaction): void {
    this.modify(caller, { kind: 'write', path, value: Buffer.from(value) }, tx);
  }

  mkdir(caller: Caller, path: string, tx?: Transaction): void {
    this.modify(caller, { kind: 'mkdir', path }, tx);
  }

  rm(caller: Caller, path: string, tx?: Transaction): void {
    this.modify(caller, { kind: 'rm', path }, tx);
  }

  setPerms(caller: Caller, path: string, perms: Perm[], tx?: Transaction): void {
    this.modify(caller, { kind: 'setperms', path, perms }, tx);
  }

  /** Run one operation on a copy of the (live or transaction) tree and keep the copy only on success. */
  private modify(caller: Caller, op: Op, tx?: Transaction): void {
    const work = (tx ? tx.tree : this.main).clone();
    const changes: Change[] = [];
    this.apply(work, caller, op, changes, tx);
    if (tx) {
      tx.tree = work;
      tx.ops.push({ caller, op });
    } else {
      this.main = work;
      if (changes.length) this.onChange(changes);
    }
  }

  private apply(t: Tree, caller: Caller, op: Op, changes: Change[], tx?: Transaction): void {
    const gen = this.gen++;
    const path = op.path;
    const node = t.get(path);
    if (tx) this.touch(tx, path, node);
    switch (op.kind) {
      case 'write':
      case 'mkdir': {
        if (node) {
          this.mustWrite(caller, node, path);
          if (op.kind === 'mkdir') return; // MKDIR of an existing node succeeds without change
          this.checkNodeSize(caller, op.value, node.perms);
          const owner = node.perms[0]!.domid;
          this.checkMemory(t, caller, owner, op.value.length - node.value.length);
          t.account(owner, 0, op.value.length - node.value.length);
          t.put(path, { ...node, value: op.value, gen }, gen);
          changes.push({ path, removed: false, perms: node.perms });
          return;
        }
        const value = op.kind === 'write' ? op.value : EMPTY;
        this.create(t, caller, path, value, gen, tx);
        changes.push({ path, removed: false, perms: t.get(path)!.perms });
        return;
      }
      case 'rm': {
        if (path === '/') fail('EINVAL', 'cannot remove /');
        if (!node) {
          const parent = t.get(parentOf(path));
          if (tx) this.touch(tx, parentOf(path), parent);
          if (!parent) this.missing(t, caller, path);
          if (!caller.privileged && !canRead(parent.perms, caller.domid)) fail('EACCES', `dom${caller.domid} may not read ${parentOf(path)}`);
          return; // removing a missing leaf of an existing parent is OK
        }
        this.mustWrite(caller, node, path);
        const parent = parentOf(path);
        if (tx) this.touch(tx, parent, t.get(parent));
        for (const [p, n] of walk(path, node)) {
          if (tx) this.touch(tx, p, n);
          t.account(n.perms[0]!.domid, -1, -nodeBytes(p, n.value, n.perms));
        }
        t.put(path, undefined, gen);
        changes.push({ path, removed: true, perms: node.perms });
        return;
      }
      case 'setperms': {
        if (!node) this.missing(t, caller, path);
        if (!caller.privileged) {
          if (node.perms[0]!.domid !== caller.domid) fail('EACCES', `dom${caller.domid} does not own ${path}`);
          if (op.perms[0]!.domid !== caller.domid) fail('EPERM', `only dom0 may give ${path} away`);
          if (op.perms.length > this.quotas.permsPerNode) fail('ENOSPC', `more than ${this.quotas.permsPerNode} permissions`);
          this.checkNodeSize(caller, node.value, op.perms);
        }
        const after = nodeBytes(path, node.value, op.perms);
        this.checkMemory(t, caller, op.perms[0]!.domid, op.perms[0]!.domid === node.perms[0]!.domid ? after - nodeBytes(path, node.value, node.perms) : after);
        t.account(node.perms[0]!.domid, -1, -nodeBytes(path, node.value, node.perms));
        t.account(op.perms[0]!.domid, +1, after);
        t.put(path, { ...node, perms: op.perms, gen }, gen);
        changes.push({ path, removed: false, perms: op.perms, oldPerms: node.perms });
        return;
      }
    }
  }

  /** Create `path` and any missing ancestors, each inheriting its parent's perms (owner: a guest caller). */
  private create(t: Tree, caller: Caller, path: string, value: Buffer, gen: number, tx?: Transaction): void {
    const missing: string[] = [path];
    let p = parentOf(path);
    let parent = t.get(p);
    while (!parent) {
      if (tx) this.touch(tx, p, undefined);
      missing.unshift(p);
      p = parentOf(p);
      parent = t.get(p);
    }
    if (tx) this.touch(tx, p, parent);
    this.mustWrite(caller, parent, p);
    if (!caller.privileged) {
      const have = t.owned.get(caller.domid) ?? 0;
      if (have + missing.length > this.quotas.nodes) fail('ENOSPC', `dom${caller.domid} node quota ${this.quotas.nodes}`);
    }
    let perms = parent.perms;
    for (const m of missing) {
      if (!caller.privileged && perms[0]!.domid !== caller.domid) perms = [{ domid: caller.domid, access: perms[0]!.access }, ...perms.slice(1)];
      const v = m === path ? value : EMPTY;
      this.checkNodeSize(caller, v, perms);
      const cost = nodeBytes(m, v, perms);
      this.checkMemory(t, caller, perms[0]!.domid, cost);
      t.put(m, { value: v, perms, children: new Map(), gen }, gen);
      t.account(perms[0]!.domid, +1, cost);
    }
  }

  private mustWrite(caller: Caller, node: Node, path: string): void {
    if (!caller.privileged && !canWrite(node.perms, caller.domid)) fail('EACCES', `dom${caller.domid} may not write ${path}`);
  }

  private checkNodeSize(caller: Caller, value: Buffer, perms: readonly Perm[]): void {
    // C xenstored counts the value and the permission array (8 bytes an entry) against the node size.
    if (!caller.privileged && value.length + 8 * perms.length > this.quotas.nodeSize) {
      fail('ENOSPC', `node of ${value.length} bytes exceeds dom${caller.domid}'s node size quota ${this.quotas.nodeSize}`);
    }
  }

  /** A guest may not grow a (non-dom0) owner past the memory quota. */
  private checkMemory(t: Tree, caller: Caller, owner: number, delta: number): void {
    if (caller.privileged || owner === 0 || delta <= 0) return;
    if ((t.bytes.get(owner) ?? 0) + delta > this.quotas.memory) {
      fail('ENOSPC', `dom${owner} memory quota ${this.quotas.memory} bytes`);
    }
  }

  private touch(tx: Transaction, path: string, node: Node | undefined): void {
    if (tx.accessed.has(path)) return;
    if (!tx.caller.privileged && tx.accessed.size >= this.quotas.nodesPerTransaction) {
      fail('ENOSPC', `transaction touches more than ${this.quotas.nodesPerTransaction} nodes`);
    }
    tx.accessed.set(path, node ? node.gen : -1);
  }

  // ---- transactions -------------------------------------------------------------------------------

  startTransaction(caller: Caller): Transaction {
    let id = this.nextTxId;
    // ids are opaque u32s; skip 0 (no transaction) and any still in use after wrapping
    while (id === 0 || this.txs.has(id)) id = (id + 1) >>> 0;
    this.nextTxId = (id + 1) >>> 0;
    const tx = new Transaction(id, caller, this.main.clone());
    this.txs.set(id, tx);
    return tx;
  }

  transaction(id: number): Transaction | undefined {
    return this.txs.get(id);
  }

  /** End a transaction: commit (EAGAIN if anything it touched changed meanwhile) or discard. */
  endTransaction(tx: Transaction, commit: boolean): void {
    this.txs.delete(tx.id);
    if (!commit || tx.ops.length === 0) {
      // a read-only transaction still has to have seen a consistent snapshot to succeed
      if (commit && !this.unchanged(tx)) fail('EAGAIN', `transaction ${tx.id} conflicts`);
      return;
    }
    if (!this.unchanged(tx)) fail('EAGAIN', `transaction ${tx.id} conflicts`);
    const work = this.main.clone();
    const changes: Change[] = [];
    for (const { caller, op } of tx.ops) this.apply(work, caller, op, changes);
    this.main = work;
    if (changes.length) this.onChange(changes);
  }

  private unchanged(tx: Transaction): boolean {
    for (const [path, gen] of tx.accessed) if ((this.main.get(path)?.gen ?? -1) !== gen) return false;
    return true;
  }

  // ---- domains ------------------------------------------------------------------------------------

  /** Make sure /local/domain/<domid> exists, owned by the domain (what the toolstack does on create). */
  ensureDomainHome(domid: number): void {
    const path = `/local/domain/${domid}`;
    if (this.main.get(path)) return;
    this.modify({ domid: 0, privileged: true }, { kind: 'mkdir', path });
    this.modify({ domid: 0, privileged: true }, { kind: 'setperms', path, perms: [{ domid, access: 'n' }] });
  }

  /** Remove every node owned by a released domain (with its subtree), as xenstored does. */
  removeDomainNodes(domid: number): void {
    const doomed: string[] = [];
    for (const [p, n] of walk('/', this.main.root)) {
      if (n.perms[0]!.domid === domid && !doomed.some((d) => p.startsWith(d + '/'))) doomed.push(p);
    }
    for (const p of doomed) if (p !== '/') this.modify({ domid: 0, privileged: true }, { kind: 'rm', path: p });
  }

  /** Drop a transaction without committing (its connection went away). */
  dropTransaction(tx: Transaction): void {
    this.txs.delete(tx.id);
  }
}
