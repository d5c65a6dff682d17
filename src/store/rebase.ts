import fs from 'node:fs';
import path from 'node:path';
import { TlcError } from '../core/errors.js';
import { fsyncDir, writeFileAtomic } from '../core/fsutil.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import { ChainBlockReader, ramChain } from './chain.js';
import { allocatedBytes, openNew, readFull, writeDurable, writeFull } from './fileio.js';
import {
  MANIFEST_FILE,
  type Manifest,
  type ManifestBlock,
  PAGE_SIZE,
  SUMS_CHUNK_BYTES,
  checkpointFilePath,
  sealManifest,
  sha256Hex,
} from './manifest.js';
import { HASHES_HEADER_BYTES, HASH_BYTES, ZERO_HASH } from './page-hash.js';
import { openManifest } from './schema.js';
import type { StoredCheckpoint } from './store.js';
import { chunkCount, hashChunk, newSums } from './sums.js';

export const REBASE_PREFIX = '.rebase-';
const PAGES_PER_CHUNK = SUMS_CHUNK_BYTES / PAGE_SIZE;

/**
 * Rewrites checkpoint `child` so its RAM builds on `newParent` instead of its current parent
 * (which is about to be removed), or stands alone when `newParent` is undefined: the pages it
 * needed from the parents that go are merged into it. Its content, page hashes, config, device
 * state and disks are unchanged (linked, not copied).
 *
 * The new version is built beside the store in `.rebase-<pid>-<id>` and swapped in by two
 * renames; `CheckpointStore` finishes or drops a swap a crash interrupted (see `recoverRebases`).
 * A signed manifest is signed again, so this needs the key then.
 */
export function rebaseCheckpoint(
  storeDir: string,
  child: StoredCheckpoint,
  newParent: StoredCheckpoint | undefined,
  load: (id: string) => StoredCheckpoint,
  signKey: Buffer | undefined,
): StoredCheckpoint {
  if (child.manifest.signature && !signKey) {
    throw new TlcError(
      'E_USAGE',
      `${child.id} is signed and must be rewritten to keep its chain whole; the signing key is needed (--sign-key or $TLC_SIGN_KEY)`,
    );
  }
  const chain = ramChain(child, load);
  const staging = path.join(storeDir, `${REBASE_PREFIX}${process.pid}-${child.id}`);
  fs.rmSync(staging, { recursive: true, force: true });
  fs.mkdirSync(staging, { mode: PRIVATE_DIR_MODE });
  try {
    const named = new Set<string>([MANIFEST_FILE]);
    const blocks: ManifestBlock[] = [];
    let storedBytes = 0;
    child.manifest.blocks.forEach((b, i) => {
      named.add(b.file).add(b.sumsFile);
      // Deltas are against the parent that goes: the rebased image holds full pages.
      if (b.deltaFile !== undefined) named.add(b.deltaFile);
      const np = newParent?.manifest.blocks[i];
      const npHashes = np?.hashesFile ? checkpointFilePath(newParent?.dir ?? '', np.hashesFile) : undefined;
      const rebased = rebaseBlock(chain, i, staging, b, npHashes);
      blocks.push(rebased.block);
      storedBytes += rebased.bytes;
    });
    // Everything else (hashes, config, device state, disk layers) is the same bytes: linked.
    for (const name of fs.readdirSync(child.dir)) {
      if (named.has(name)) continue;
      fs.linkSync(checkpointFilePath(child.dir, name), path.join(staging, name));
      storedBytes += allocatedBytes(path.join(staging, name));
    }
    const { parent: _old, storedBytes: _bytes, ...rest } = child.manifest;
    const m: Manifest = {
      ...rest,
      blocks,
      ...(newParent ? { parent: newParent.id } : {}),
      storedBytes,
    };
    const sealed = sealManifest(m, child.manifest.signature ? signKey : undefined);
    openManifest(sealed, `rebased checkpoint ${child.id} (not published)`);
    writeFileAtomic(path.join(staging, MANIFEST_FILE), sealed, 0o600);
    fsyncDir(staging);
    // The swap: the old version out, the new in. A crash in between leaves only `.rebase-...`,
    // which the store renames into place on its next staging sweep.
    const old = path.join(storeDir, `.tmp-rm-${child.id}-${process.pid}`);
    fs.renameSync(child.dir, old);
    fs.renameSync(staging, child.dir);
    fsyncDir(storeDir);
    fs.rmSync(old, { recursive: true, force: true });
    return { id: child.id, dir: child.dir, manifest: m };
  } catch (err) {
    if (fs.existsSync(child.dir)) fs.rmSync(staging, { recursive: true, force: true });
    throw err;
  }
}

/** Writes block `index` relative to the new parent's page hashes (none: every data page). */
function rebaseBlock(
  chain: readonly StoredCheckpoint[],
  index: number,
  staging: string,
  old: ManifestBlock,
  newParentHashes: string | undefined,
): { block: ManifestBlock; bytes: number } {
  const reader = new ChainBlockReader(chain, index);
  const imageFile = path.join(staging, old.file);
  const sums = newSums(reader.length);
  const chunk = Buffer.allocUnsafe(SUMS_CHUNK_BYTES);
  const np = new BigUint64Array(PAGES_PER_CHUNK);
  const npBytes = Buffer.from(np.buffer);
  const out = openNew(imageFile);
  const pfd = newParentHashes ? fs.openSync(newParentHashes, 'r') : -1;
  let storedPages = 0;
  try {
    fs.ftruncateSync(out, reader.length);
    for (let c = 0; c < chunkCount(reader.length); c++) {
      const at = c * SUMS_CHUNK_BYTES;
      const len = reader.readChunk(c, chunk);
      const pages = Math.ceil(len / PAGE_SIZE);
      const newest = reader.hashes[0] as BigUint64Array;
      if (pfd >= 0) {
        const hashAt = HASHES_HEADER_BYTES + c * PAGES_PER_CHUNK * HASH_BYTES;
        readFull(pfd, npBytes, pages * HASH_BYTES, hashAt, newParentHashes as string);
      }
      let runFrom = -1;
      for (let p = 0; p <= pages; p++) {
        const h = p < pages ? (newest[p] as bigint) : ZERO_HASH;
        const stored = h !== ZERO_HASH && (pfd < 0 || h !== np[p]);
        if (stored) {
          storedPages++;
          if (runFrom < 0) runFrom = p;
          continue;
        }
        if (p < pages) chunk.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
        if (runFrom >= 0) {
          const from = runFrom * PAGE_SIZE;
          writeFull(out, chunk.subarray(from), (p - runFrom) * PAGE_SIZE, at + from, imageFile);
          runFrom = -1;
        }
      }
      hashChunk(chunk.subarray(0, len), sums, c);
    }
    fs.fdatasyncSync(out);
  } finally {
    fs.closeSync(out);
    if (pfd >= 0) fs.closeSync(pfd);
    reader.close();
  }
  writeDurable(path.join(staging, old.sumsFile), sums);
  const { deltaFile: _f, deltaSha256: _s, deltaBytes: _b, deltaPages: _p, ...kept } = old;
  return {
    block: { ...kept, sumsSha256: sha256Hex(sums), storedPages },
    bytes: allocatedBytes(imageFile) + sums.length,
  };
}

/**
 * Finishes what a crash left of a rebase: a `.rebase-<pid>-<id>` of a dead process whose
 * checkpoint directory is gone is the new version mid-swap (renamed into place); one whose
 * checkpoint still exists never started its swap (dropped).
 */
export function recoverRebases(
  storeDir: string,
  entries: readonly string[],
  alive: (pid: number) => boolean,
): void {
  for (const entry of entries) {
    if (!entry.startsWith(REBASE_PREFIX)) continue;
    const rest = entry.slice(REBASE_PREFIX.length);
    const dash = rest.indexOf('-');
    const pid = Number(rest.slice(0, dash));
    const id = rest.slice(dash + 1);
    if (dash <= 0 || !Number.isInteger(pid) || alive(pid) || id === '' || id.startsWith('.')) continue;
    const dir = path.join(storeDir, id);
    const from = path.join(storeDir, entry);
    if (fs.existsSync(dir)) fs.rmSync(from, { recursive: true, force: true });
    else if (fs.existsSync(path.join(from, MANIFEST_FILE))) fs.renameSync(from, dir);
    else fs.rmSync(from, { recursive: true, force: true });
  }
}
