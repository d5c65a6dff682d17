import fs from 'node:fs';
import path from 'node:path';
import { fsyncDir, hashFile } from '../core/fsutil.js';
import { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../core/paths.js';
import { compatibleParent } from './chain.js';
import { readFull } from './fileio.js';
import { PAGE_SIZE, SUMS_CHUNK_BYTES, checkpointFilePath, type ManifestBlock } from './manifest.js';
import { HASHES_HEADER_BYTES, HASH_BYTES, ZERO_HASH, hashPages } from './page-hash.js';
import type { BlockSpec } from './staged.js';
import type { StoredCheckpoint } from './store.js';

/**
 * A VM's receive files, kept between its checkpoints (`<vm dir>/scratch/block-<n>.img`, on the
 * host that runs the VM whatever the store is; they cost disk space of the guest's data once).
 *
 * Why: the first touch of a page costs a page fault, and on this nested-virtualization host a
 * fresh page costs far more than the copy (measured: pwrite into new page-cache pages 235-900
 * MB/s, into pages already cached 8.5 GB/s). Receiving into the page-cache pages of the previous
 * checkpoint's receive file keeps QEMU's stream at memory speed without holding anything in tlc.
 *
 * The files then hold the previous checkpoint's RAM, which is exactly right as a starting point
 * when that checkpoint is the VM's newest: QEMU's first pass sends every page anyway, and a "zero
 * page" record must be written only where the old content was not zero. A marker names the
 * checkpoint the files hold and the boot they were written in (page-cache contents a crash lost
 * must never be trusted); any doubt and the files are cleared.
 */
const MARKER = 'holds.json';

export interface ScratchOptions {
  /** `<vm dir>/scratch`. */
  dir: string;
  /** The checkpoint being taken: the files hold it once finished. */
  id: string;
  /** The VM's newest checkpoint, which the files may still hold. */
  newest?: StoredCheckpoint;
}

export interface ScratchBlock {
  file: string;
  fd: number;
  /** One bit per page: the page may hold non-zero data now. */
  maybeData: Uint8Array;
}

/** Whether the receive files hold the VM's newest checkpoint (their page cache is then warm too). */
export function scratchHoldsNewest(opts: ScratchOptions, blocks: readonly BlockSpec[]): boolean {
  const held = readMarker(path.join(opts.dir, MARKER));
  return (
    opts.newest !== undefined &&
    held?.id === opts.newest.id &&
    held.boot === bootId() &&
    compatibleParent(opts.newest, blocks) &&
    hashesIntact(opts.newest)
  );
}

/** Opens the receive files for `blocks`, keeping their contents only when they hold the newest checkpoint. */
export function openScratch(opts: ScratchOptions, blocks: readonly BlockSpec[]): ScratchBlock[] {
  fs.mkdirSync(opts.dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  const marker = path.join(opts.dir, MARKER);
  const keep = scratchHoldsNewest(opts, blocks);
  // From here on the files change: the marker goes first, durably.
  fs.rmSync(marker, { force: true });
  fsyncDir(opts.dir);
  return blocks.map((b, i) => {
    const file = path.join(opts.dir, `block-${i}.img`);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, PRIVATE_FILE_MODE);
    const st = fs.fstatSync(fd);
    if (!keep || st.size !== b.usedLength) {
      fs.ftruncateSync(fd, 0);
      fs.ftruncateSync(fd, b.usedLength);
    }
    const maybeData = new Uint8Array(Math.ceil(b.usedLength / PAGE_SIZE / 8));
    if (keep && st.size === b.usedLength && opts.newest) nonZeroPages(opts.newest, i, maybeData);
    return { file, fd, maybeData };
  });
}

/** After `finish`: the files hold checkpoint `id` (valid for its children while this boot lasts). */
export function markScratch(dir: string, id: string): void {
  fs.writeFileSync(path.join(dir, MARKER), JSON.stringify({ id, boot: bootId() }), {
    mode: PRIVATE_FILE_MODE,
  });
}

function readMarker(file: string): { id: string; boot: string } | undefined {
  try {
    const m = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    if (typeof m === 'object' && m !== null && 'id' in m && 'boot' in m) {
      const { id, boot } = m as { id: unknown; boot: unknown };
      if (typeof id === 'string' && typeof boot === 'string') return { id, boot };
    }
  } catch {
    // no marker, or not ours: the files are cleared
  }
  return undefined;
}

function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown-boot';
  }
}

/** The page hashes that decide which pages to zero must be the ones the manifest names. */
function hashesIntact(ckpt: StoredCheckpoint): boolean {
  try {
    return ckpt.manifest.blocks.every(
      (b) => hashFile(checkpointFilePath(ckpt.dir, b.hashesFile ?? '')).sha256 === b.hashesSha256,
    );
  } catch {
    return false;
  }
}

/** Sets a bit for every page `ckpt`'s hashes say is non-zero in block `index`. */
function nonZeroPages(ckpt: StoredCheckpoint, index: number, out: Uint8Array): void {
  const b = ckpt.manifest.blocks[index] as ManifestBlock;
  const file = checkpointFilePath(ckpt.dir, b.hashesFile ?? '');
  const pagesPerChunk = SUMS_CHUNK_BYTES / PAGE_SIZE;
  const hashes = new BigUint64Array(pagesPerChunk);
  const buf = Buffer.from(hashes.buffer);
  const pages = Math.ceil(b.usedLength / PAGE_SIZE);
  const fd = fs.openSync(file, 'r');
  try {
    for (let first = 0; first < pages; first += pagesPerChunk) {
      const n = Math.min(pagesPerChunk, pages - first);
      readFull(fd, buf, n * HASH_BYTES, HASHES_HEADER_BYTES + first * HASH_BYTES, file);
      for (let p = 0; p < n; p++) {
        const page = first + p;
        if (hashes[p] !== ZERO_HASH) (out[page >>> 3] as number) |= 1 << (page & 7);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Restore's shortcut: when a VM's receive files hold exactly checkpoint `ckpt` (its marker, this
 * boot, every page matching the checkpoint's page hashes), block `index`'s file is renamed to
 * `dest` and becomes the restored VM's RAM image: no assembly, and its page cache is warm. The
 * marker goes first, so the files are never trusted again. Returns false (nothing changed but,
 * possibly, the marker) when anything does not hold. Never call it while the VM may checkpoint.
 */
export function adoptScratchImage(dir: string, ckpt: StoredCheckpoint, index: number, dest: string): boolean {
  const marker = path.join(dir, MARKER);
  const held = readMarker(marker);
  const b = ckpt.manifest.blocks[index];
  if (!b?.hashesFile || held?.id !== ckpt.id || held.boot !== bootId() || !hashesIntact(ckpt)) return false;
  const file = path.join(dir, `block-${index}.img`);
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return false;
  }
  try {
    if (fs.fstatSync(fd).size !== b.usedLength || !matchesHashes(fd, file, ckpt, b)) return false;
  } finally {
    fs.closeSync(fd);
  }
  fs.rmSync(marker, { force: true });
  fsyncDir(dir);
  try {
    fs.renameSync(file, dest);
    return true;
  } catch {
    return false;
  }
}

/** Every page of the open file `fd` hashes as `b`'s page hashes say. */
function matchesHashes(fd: number, file: string, ckpt: StoredCheckpoint, b: ManifestBlock): boolean {
  const hfile = checkpointFilePath(ckpt.dir, b.hashesFile ?? '');
  const hfd = fs.openSync(hfile, 'r');
  const chunk = Buffer.allocUnsafe(SUMS_CHUNK_BYTES);
  const pagesPerChunk = SUMS_CHUNK_BYTES / PAGE_SIZE;
  const want = new BigUint64Array(pagesPerChunk);
  const wantBytes = Buffer.from(want.buffer);
  const got = new BigUint64Array(pagesPerChunk);
  try {
    for (let at = 0; at < b.usedLength; at += SUMS_CHUNK_BYTES) {
      const len = Math.min(SUMS_CHUNK_BYTES, b.usedLength - at);
      const pages = Math.ceil(len / PAGE_SIZE);
      readFull(fd, chunk, len, at, file);
      readFull(
        hfd,
        wantBytes,
        pages * HASH_BYTES,
        HASHES_HEADER_BYTES + (at / PAGE_SIZE) * HASH_BYTES,
        hfile,
      );
      hashPages(chunk, len, got);
      for (let p = 0; p < pages; p++) if (got[p] !== want[p]) return false;
    }
    return true;
  } finally {
    fs.closeSync(hfd);
  }
}
