import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PersistError, StoreError, TlcError, errorText, isErrnoCode } from '../core/errors.js';
import { fsyncDir } from '../core/fsutil.js';
import { PRIVATE_DIR_MODE, defaultStoreDir } from '../core/paths.js';
import { MANIFEST_FILE, type Manifest, type ManifestDisk } from './manifest.js';
import { openManifest } from './schema.js';
import { rebaseCheckpoint, recoverRebases } from './rebase.js';

const STAGING_PREFIX = '.tmp-';

export interface StoredCheckpoint {
  id: string;
  dir: string;
  manifest: Manifest;
}

export interface RemoveOptions {
  /** Re-signs a signed checkpoint whose RAM must be rewritten to keep its chain whole. */
  signKey?: Buffer;
}

export interface RemovedCheckpoint {
  id: string;
  dir: string;
}

/** One disk of a checkpoint with its whole layer chain followed through the store. */
export interface DiskChain {
  device: string;
  node: string;
  format: ManifestDisk['format'];
  virtualSize: number;
  captured: boolean;
  reason?: string;
  /** Bytes of this checkpoint's own layers of the disk. */
  storedBytes: number;
  /** Bytes of every layer of the chain (this checkpoint's and its parents'), as far as it could be followed. */
  chainBytes: number;
  /** Checkpoints the chain runs through, this one first, down to the full copy. */
  checkpoints: string[];
  /** True when this checkpoint's copy builds on a parent checkpoint's layers. */
  incremental: boolean;
  /** Where the chain could not be followed: the checkpoint, and why ("missing", "damaged: ..."). */
  broken?: { checkpoint: string; reason: string };
}

/** Bytes of a disk's layers in its own checkpoint. */
export function diskLayerBytes(disk: ManifestDisk): number {
  return disk.layers.reduce((n, l) => n + l.bytes, 0);
}

/** Longest chain followed before a manifest is taken to be cyclic. */
const MAX_CHAIN = 1000;

/**
 * A directory of checkpoints. A checkpoint is built in `.tmp-<id>-<pid>` and becomes visible only
 * by an atomic rename once complete and fsynced; listing never shows a staging directory.
 */
export class CheckpointStore {
  readonly dir: string;

  constructor(dir?: string) {
    this.dir = path.resolve(dir ?? defaultStoreDir());
  }

  private ensure(): void {
    try {
      fs.mkdirSync(this.dir, { recursive: true, mode: PRIVATE_DIR_MODE });
    } catch (err) {
      throw new PersistError('create store directory', this.dir, err);
    }
  }

  newId(vmName: string): string {
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
    return `${vmName}-${stamp}-${randomBytes(2).toString('hex')}`;
  }

  /** Creates a private staging directory for checkpoint `id`, sweeping staging dirs of dead runs. */
  stage(id: string): string {
    this.ensure();
    this.sweepStale();
    const staging = path.join(this.dir, `${STAGING_PREFIX}${id}-${process.pid}`);
    try {
      fs.mkdirSync(staging, { mode: PRIVATE_DIR_MODE });
    } catch (err) {
      throw new PersistError('create', staging, err);
    }
    return staging;
  }

  /** Makes a complete staging directory visible as checkpoint `id`. */
  publish(staging: string, id: string): string {
    const final = path.join(this.dir, id);
    fsyncDir(staging);
    try {
      fs.renameSync(staging, final);
    } catch (err) {
      throw new PersistError('publish (rename)', final, err);
    }
    fsyncDir(this.dir);
    return final;
  }

  discard(staging: string): void {
    fs.rmSync(staging, { recursive: true, force: true });
  }

  private sweepStale(): void {
    recoverRebases(this.dir, safeReaddir(this.dir), pidAlive);
    for (const entry of safeReaddir(this.dir)) {
      if (!entry.startsWith(STAGING_PREFIX)) continue;
      const pid = Number(entry.slice(entry.lastIndexOf('-') + 1));
      if (Number.isInteger(pid) && pid > 0 && !pidAlive(pid)) {
        fs.rmSync(path.join(this.dir, entry), { recursive: true, force: true });
      }
    }
  }

  list(): StoredCheckpoint[] {
    const out: StoredCheckpoint[] = [];
    for (const entry of safeReaddir(this.dir)) {
      if (entry.startsWith('.')) continue;
      const dir = path.join(this.dir, entry);
      try {
        out.push({ id: entry, dir, manifest: readManifest(dir) });
      } catch {
        // not a checkpoint (or a damaged one: `tlc verify` names it)
      }
    }
    return out.sort((a, b) => a.manifest.createdAt.localeCompare(b.manifest.createdAt));
  }

  /**
   * Finds one checkpoint, in this order: its exact id; a VM name (that VM's newest checkpoint); a
   * unique id prefix, where a checkpoint counts only if `ref` starts with its own VM name and `-`
   * (so `web` or `web-2026` never picks a checkpoint of VM `web2`). An empty or ambiguous
   * reference is an E_USAGE error.
   */
  resolve(ref: string): StoredCheckpoint {
    if (ref === '') throw new TlcError('E_USAGE', 'Empty checkpoint reference (give an id or a VM name)');
    const exact = this.exactDir(ref);
    if (exact && fs.existsSync(path.join(exact, MANIFEST_FILE))) {
      return { id: ref, dir: exact, manifest: readManifest(exact) };
    }
    const all = this.list();
    const newestOfVm = all.filter((c) => c.manifest.vm.name === ref).at(-1);
    if (newestOfVm) return newestOfVm;
    const byPrefix = all.filter((c) => c.id.startsWith(ref) && ref.startsWith(`${c.manifest.vm.name}-`));
    if (byPrefix.length > 1) {
      throw new TlcError('E_USAGE', `"${ref}" matches ${byPrefix.length} checkpoints; give more of the id`);
    }
    if (byPrefix[0]) return byPrefix[0];
    throw new TlcError('E_NOT_FOUND', `No checkpoint "${ref}" in ${this.dir} (see: tlc ls)`);
  }

  /** The checkpoint with exactly this id; throws (E_NOT_FOUND, E_CORRUPT) when missing or damaged. */
  exact(id: string): StoredCheckpoint {
    return { id, dir: this.checkpointDir(id), manifest: readManifest(this.checkpointDir(id)) };
  }

  /** The directory of the checkpoint with exactly this id (damaged or not); throws when none. */
  private checkpointDir(id: string): string {
    if (id === '') throw new TlcError('E_USAGE', 'Empty checkpoint id');
    const dir = this.exactDir(id);
    if (dir && fs.existsSync(path.join(dir, MANIFEST_FILE))) return dir;
    const ofVm = this.list().filter((c) => c.manifest.vm.name === id).length;
    const hint =
      ofVm > 0
        ? `; "${id}" is a VM with ${ofVm} checkpoint${ofVm > 1 ? 's' : ''}: tlc rm --all ${id} removes them`
        : ' (rm takes exact ids; see: tlc ls)';
    throw new TlcError('E_NOT_FOUND', `No checkpoint with id "${id}" in ${this.dir}${hint}`);
  }

  /** `<store>/<ref>` when `ref` can be a checkpoint directory's name (one component, not hidden). */
  private exactDir(ref: string): string | undefined {
    if (ref === '' || ref.startsWith('.') || ref.includes('/') || ref.includes('\0')) return undefined;
    return path.join(this.dir, ref);
  }

  /** The checkpoint with exactly this id, or undefined when it is missing or its manifest is damaged. */
  private tryExact(id: string): StoredCheckpoint | undefined {
    const dir = this.exactDir(id);
    if (!dir) return undefined;
    try {
      return { id, dir, manifest: readManifest(dir) };
    } catch {
      return undefined;
    }
  }

  /** Ids of the checkpoints whose disk layers build directly on checkpoint `id`'s, oldest first. */
  dependents(id: string): string[] {
    return dependentsIn(this.list(), id);
  }

  /**
   * `id` and every checkpoint its disks build on, following `parent` as far as the store has the
   * checkpoints (a missing or damaged one ends that branch).
   */
  ancestors(id: string): string[] {
    const seen = new Set<string>([id]);
    const queue = [id];
    while (queue.length > 0 && seen.size <= MAX_CHAIN) {
      const c = this.tryExact(queue.shift() as string);
      for (const d of c?.manifest.disks ?? []) {
        const p = d.parent?.checkpoint;
        if (p !== undefined && !seen.has(p)) {
          seen.add(p);
          queue.push(p);
        }
      }
    }
    return [...seen];
  }

  /** Each disk of a checkpoint with its layer chain followed through the store (see `DiskChain`). */
  diskChains(ckpt: StoredCheckpoint): DiskChain[] {
    return (ckpt.manifest.disks ?? []).map((disk) => {
      const chain: DiskChain = {
        device: disk.device,
        node: disk.node,
        format: disk.format,
        virtualSize: disk.virtualSize,
        captured: disk.captured,
        ...(disk.reason !== undefined ? { reason: disk.reason } : {}),
        storedBytes: diskLayerBytes(disk),
        chainBytes: diskLayerBytes(disk),
        checkpoints: [ckpt.id],
        incremental: disk.parent !== undefined,
      };
      let entry = disk;
      while (entry.parent) {
        const { checkpoint: parentId, file } = entry.parent;
        if (chain.checkpoints.includes(parentId) || chain.checkpoints.length > MAX_CHAIN) {
          chain.broken = { checkpoint: parentId, reason: 'cyclic chain' };
          break;
        }
        const dir = this.exactDir(parentId);
        if (!dir || !fs.existsSync(path.join(dir, MANIFEST_FILE))) {
          chain.broken = { checkpoint: parentId, reason: 'missing' };
          break;
        }
        let parent: Manifest;
        try {
          parent = readManifest(dir);
        } catch (err) {
          chain.broken = { checkpoint: parentId, reason: `damaged: ${errorText(err)}` };
          break;
        }
        const next = parent.disks?.find((d) => d.node === entry.node && d.captured);
        if (!next || next.layers.at(-1)?.file !== file) {
          chain.broken = { checkpoint: parentId, reason: `has no layer ${file} for disk ${disk.device}` };
          break;
        }
        chain.checkpoints.push(parentId);
        chain.chainBytes += diskLayerBytes(next);
        entry = next;
      }
      return chain;
    });
  }

  /**
   * Removes exactly the checkpoint with id `id` (no prefix, no VM name). A checkpoint whose
   * manifest is damaged can be removed too (it is not listed, but `tlc verify` names it). A
   * checkpoint that later checkpoints' disks build on is refused (see `removeIds`).
   */
  remove(id: string): RemovedCheckpoint {
    return this.removeIds([id])[0] as RemovedCheckpoint;
  }

  /**
   * Removes exactly the checkpoints with these ids, or none: every id is checked before the first
   * is removed, so a typo in one removes nothing. A chain is never broken: a checkpoint whose disk
   * layers another checkpoint builds on is removed only together with that checkpoint (dependents
   * go first, so an interrupted removal leaves only whole chains).
   */
  removeIds(ids: readonly string[], opts: RemoveOptions = {}): RemovedCheckpoint[] {
    const unique = [...new Set(ids)];
    for (const id of unique) this.checkpointDir(id);
    return this.removeSet(unique, opts);
  }

  /**
   * Removes all but the newest `keep` checkpoints of VM `vmName` (`tlc prune`); the RAM of the
   * kept ones is merged so none loses a parent it needs.
   */
  prune(vmName: string, keep: number, opts: RemoveOptions = {}): RemovedCheckpoint[] {
    if (!Number.isInteger(keep) || keep < 1)
      throw new TlcError('E_USAGE', '--keep must be a whole number >= 1');
    const ofVm = this.list().filter((c) => c.manifest.vm.name === vmName);
    if (ofVm.length === 0) {
      throw new TlcError('E_NOT_FOUND', `No checkpoints of VM "${vmName}" in ${this.dir} (see: tlc ls)`);
    }
    const doomed = ofVm.slice(0, Math.max(0, ofVm.length - keep)).map((c) => c.id);
    return doomed.length === 0 ? [] : this.removeSet(doomed, opts);
  }

  /**
   * Before checkpoints go: every kept checkpoint whose RAM builds on one of them is rewritten onto
   * its nearest kept ancestor (or made full), all before the first removal, so an interrupted
   * removal leaves every chain whole.
   */
  private mergeRamChildren(
    all: readonly StoredCheckpoint[],
    doomed: ReadonlySet<string>,
    opts: RemoveOptions,
  ): void {
    const byId = new Map(all.map((c) => [c.id, c]));
    for (const child of all) {
      if (doomed.has(child.id) || child.manifest.parent === undefined || !doomed.has(child.manifest.parent))
        continue;
      let anc: string | undefined = child.manifest.parent;
      while (anc !== undefined && doomed.has(anc)) anc = byId.get(anc)?.manifest.parent;
      const newParent = anc === undefined ? undefined : this.exact(anc);
      rebaseCheckpoint(this.dir, child, newParent, (id) => this.exact(id), opts.signKey);
    }
  }

  /**
   * Removes every listed checkpoint of VM `vmName` (`tlc rm --all VM`), newest first, so no
   * checkpoint is ever left without the layers it builds on; returned oldest first, as listed.
   * Refused (nothing removed) when another VM's checkpoint builds on one of them.
   */
  removeAllOf(vmName: string): RemovedCheckpoint[] {
    if (vmName === '') throw new TlcError('E_USAGE', 'Empty VM name');
    const doomed = this.list().filter((c) => c.manifest.vm.name === vmName);
    if (doomed.length === 0) {
      throw new TlcError('E_NOT_FOUND', `No checkpoints of VM "${vmName}" in ${this.dir} (see: tlc ls)`);
    }
    const ids = doomed.map((c) => c.id);
    this.removeSet([...ids].reverse());
    return doomed.map((c) => ({ id: c.id, dir: c.dir }));
  }

  /**
   * Refuses to break a chain, then removes `ids` (existing ones) with every dependent before its
   * parent. Returns them in the order given, whatever order they were removed in.
   */
  private removeSet(ids: string[], opts: RemoveOptions = {}): RemovedCheckpoint[] {
    const all = this.list();
    const doomed = new Set(ids);
    for (const id of ids) {
      const kept = dependentsIn(all, id).filter((d) => !doomed.has(d));
      if (kept.length === 0) continue;
      const vm = all.find((c) => c.id === id)?.manifest.vm.name;
      const sameVm =
        vm !== undefined && kept.every((d) => all.find((c) => c.id === d)?.manifest.vm.name === vm);
      const them = kept.length > 1 ? 'them' : 'it';
      throw new TlcError(
        'E_USAGE',
        `Cannot remove ${id}: checkpoint${kept.length > 1 ? 's' : ''} ${kept.join(', ')} build${kept.length > 1 ? '' : 's'} on its disk layers; ` +
          `remove ${them} first${sameVm ? `, or use tlc rm --all ${vm}` : ''}`,
      );
    }
    this.mergeRamChildren(all, doomed, opts);
    // Dependents first: a depth-first walk that places a checkpoint after everything built on it.
    const order: string[] = [];
    const placed = new Set<string>();
    const place = (id: string): void => {
      if (placed.has(id)) return;
      placed.add(id);
      for (const d of dependentsIn(all, id).reverse()) if (doomed.has(d)) place(d);
      order.push(id);
    };
    ids.forEach(place);
    const removed = new Map(order.map((id) => [id, this.removeDir(id)]));
    return ids.map((id) => removed.get(id) as RemovedCheckpoint);
  }

  private removeDir(id: string): RemovedCheckpoint {
    const dir = this.checkpointDir(id);
    // Rename first so a crash mid-delete never leaves a half-deleted checkpoint listed; a later
    // stage() sweeps the renamed directory if this process dies.
    const doomed = path.join(this.dir, `${STAGING_PREFIX}rm-${id}-${process.pid}`);
    try {
      fs.renameSync(dir, doomed);
    } catch (err) {
      throw new PersistError('remove (rename)', dir, err);
    }
    fs.rmSync(doomed, { recursive: true, force: true });
    return { id, dir };
  }
}

/** Ids of the checkpoints in `all` whose disks name `id` as their parent, in `all`'s order. */
function dependentsIn(all: readonly StoredCheckpoint[], id: string): string[] {
  return all
    .filter((c) => c.id !== id && (c.manifest.disks ?? []).some((d) => d.parent?.checkpoint === id))
    .map((c) => c.id);
}

/** A manifest is a few KiB; anything much larger is not one (and is not read into memory). */
const MAX_MANIFEST_BYTES = 16 * 1024 * 1024;

/**
 * Reads and validates `<dir>/manifest.json` (see `openManifest`), and checks that it names the
 * directory it is in. Only a regular file of bounded size is read (never a FIFO or a device).
 */
export function readManifest(dir: string): Manifest {
  const file = path.join(dir, MANIFEST_FILE);
  let text: string;
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) throw new StoreError('E_NOT_FOUND', `${dir} has no ${MANIFEST_FILE}`);
    throw new StoreError('E_STORE', `Cannot open ${file}: ${errorText(err)}`, { cause: err });
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new StoreError('E_CORRUPT', `${file}: not a regular file`);
    if (st.size > MAX_MANIFEST_BYTES) {
      throw new StoreError('E_CORRUPT', `${file}: ${st.size} bytes, too large for a manifest`);
    }
    // One byte more than its size, so a file that grows while read is noticed, not half-read.
    const buf = Buffer.allocUnsafe(st.size + 1);
    let n = 0;
    for (;;) {
      const got = fs.readSync(fd, buf, n, buf.length - n, n);
      if (got === 0) break;
      n += got;
      if (n === buf.length) throw new StoreError('E_CORRUPT', `${file}: changed while being read`);
    }
    text = buf.toString('utf8', 0, n);
  } finally {
    fs.closeSync(fd);
  }
  const m = openManifest(text, file);
  if (m.id !== path.basename(dir)) {
    throw new StoreError(
      'E_CORRUPT',
      `${file}: manifest is for checkpoint "${m.id}", not "${path.basename(dir)}"`,
    );
  }
  return m;
}

function safeReaddir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) return [];
    throw err;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return isErrnoCode(err, 'EPERM');
  }
}
