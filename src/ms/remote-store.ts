/**
 * A stored checkpoint on memory servers: every file of its directory, large ones cut into 1 MiB
 * extents (aligned with the per-MiB checksums) striped round-robin over the servers with
 * `replicas` copies each, small ones (manifest, device state, sums) as blobs on every server, and
 * an index blob saying which extents make up which file. Extents that are all zero are not sent:
 * RAM images are sparse. The servers commit only when every extent is on its replicas.
 *
 * Pulling rebuilds the directory in the local store's staging area from whichever replica
 * answers with a matching checksum, and publishes it only after tlc's own verification (every
 * file against the manifest's hashes): a checkpoint arrives complete and verified, or not at all.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CheckpointError, errorText } from '../core/errors.js';
import type { CheckpointStore, StoredCheckpoint } from '../store/store.js';
import { MANIFEST_FILE } from '../store/manifest.js';
import { openManifest } from '../store/schema.js';
import { readManifest } from '../store/store.js';
import { type VerifyOptions, assertVerified, verifyCheckpoint } from '../store/verify.js';
import { NAME_RE } from './layout.js';
import { MAX_BLOB_BYTES } from './protocol.js';
import type { ServerSet } from './serverset.js';

/** Stripe unit: one extent per MiB of a file, the unit of tlc's checksums. */
export const EXTENT_BYTES = 1024 * 1024;
/** Files up to this size travel whole, to every server. */
const BLOB_LIMIT = Math.min(MAX_BLOB_BYTES, EXTENT_BYTES);
export const INDEX_BLOB = 'tlc-files.json';
/** Extents in flight at once while pushing or pulling (every server gets work at the same time). */
const PARALLEL = 16;

interface IndexedFile {
  name: string;
  size: number;
  /** Indices of the extents with data (extent k starts at k × EXTENT_BYTES), ascending. */
  extents?: number[];
}

interface FileIndex {
  format: 1;
  id: string;
  files: IndexedFile[];
}

export interface PushReport {
  id: string;
  files: number;
  extents: number;
  bytesSent: number;
  committedOn: string[];
  failed: Array<{ url: string; error: string }>;
}

const ZERO = Buffer.alloc(EXTENT_BYTES);

/** Runs `work(i)` for i in [0, n) with at most PARALLEL running. */
async function pool(n: number, work: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const runners = Array.from({ length: Math.min(PARALLEL, n) }, async () => {
    while (next < n) await work(next++);
  });
  await Promise.all(runners);
}

/**
 * Sends checkpoint `ckpt` to the servers and commits it there, after the parents of an
 * incremental checkpoint that the servers do not hold yet (oldest first): a restore anywhere
 * needs the whole chain, and a chain member already there is not sent again.
 */
export async function pushChain(
  ckpt: StoredCheckpoint,
  store: CheckpointStore,
  servers: ServerSet,
  onProgress?: (line: string) => void,
): Promise<PushReport[]> {
  const held = new Set((await servers.list()).map((c) => c.id));
  const chain: StoredCheckpoint[] = [ckpt];
  for (let p = ckpt.manifest.parent; p && !held.has(p);) {
    const parent = store.resolve(p);
    chain.unshift(parent);
    p = parent.manifest.parent;
  }
  const reports: PushReport[] = [];
  for (const c of chain) reports.push(await pushCheckpoint(c, servers, onProgress));
  return reports;
}

/** Sends one checkpoint directory to the servers and commits it there. */
export async function pushCheckpoint(
  ckpt: StoredCheckpoint,
  servers: ServerSet,
  onProgress?: (line: string) => void,
): Promise<PushReport> {
  const names = fs
    .readdirSync(ckpt.dir, { withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => e.name);
  const index: FileIndex = { format: 1, id: ckpt.id, files: [] };
  const blobs: string[] = [];
  const extentLists: Record<string, number[]> = {};
  let bytesSent = 0;
  await servers.begin(ckpt.id);
  for (const name of names.sort()) {
    const file = path.join(ckpt.dir, name);
    const size = fs.statSync(file).size;
    if (size <= BLOB_LIMIT) {
      const data = fs.readFileSync(file);
      await servers.putBlob(ckpt.id, name, data);
      blobs.push(name);
      bytesSent += data.length;
      index.files.push({ name, size });
      continue;
    }
    const fd = fs.openSync(file, 'r');
    try {
      // Each extent is read once: sent if it holds data, skipped if all zero. Its index is its
      // place in the file, so the commit and the restore know which ones exist from the list.
      const present: number[] = [];
      const slots = Math.ceil(size / EXTENT_BYTES);
      await pool(slots, async (k) => {
        const off = k * EXTENT_BYTES;
        const len = Math.min(EXTENT_BYTES, size - off);
        const data = Buffer.allocUnsafe(len);
        fs.readSync(fd, data, 0, len, off);
        if (data.equals(ZERO.subarray(0, len))) return;
        await servers.putExtent({ ckpt: ckpt.id, block: name, index: k, offset: off, data });
        present.push(k);
        bytesSent += len;
      });
      present.sort((a, b) => a - b);
      extentLists[name] = present;
      index.files.push({ name, size, extents: present });
      onProgress?.(`${name}: ${present.length} extents of ${slots} sent`);
    } finally {
      fs.closeSync(fd);
    }
  }
  const indexData = Buffer.from(JSON.stringify(index));
  await servers.putBlob(ckpt.id, INDEX_BLOB, indexData);
  blobs.push(INDEX_BLOB);
  const { committed, failed } = await servers.commit(ckpt.id, extentLists, blobs);
  return {
    id: ckpt.id,
    files: index.files.length,
    extents: Object.values(extentLists).reduce((a, b) => a + b.length, 0),
    bytesSent,
    committedOn: committed,
    failed,
  };
}

function parseIndex(data: Buffer, id: string): FileIndex {
  let index: FileIndex;
  try {
    index = JSON.parse(data.toString('utf8')) as FileIndex;
  } catch (err) {
    throw new CheckpointError(
      `checkpoint ${id} on the servers has an unreadable file index: ${errorText(err)}`,
    );
  }
  if (
    index.format !== 1 ||
    index.id !== id ||
    !Array.isArray(index.files) ||
    !index.files.every(
      (f) =>
        NAME_RE.test(f.name) &&
        Number.isSafeInteger(f.size) &&
        f.size >= 0 &&
        (f.extents === undefined || validExtentList(f.extents, f.size)),
    )
  )
    throw new CheckpointError(`checkpoint ${id} on the servers has an invalid file index`);
  return index;
}

/** Extent indices strictly ascending, each starting inside a file of `size` bytes. */
function validExtentList(list: unknown, size: number): boolean {
  if (!Array.isArray(list)) return false;
  const slots = Math.ceil(size / EXTENT_BYTES);
  return list.every(
    (k, i) => Number.isSafeInteger(k) && k >= 0 && k < slots && (i === 0 || k > (list[i - 1] as number)),
  );
}

/**
 * Fetches checkpoint `id` and the parents of its chain the local store lacks (oldest first), each
 * verified before it is published.
 */
export async function pullChain(
  id: string,
  servers: ServerSet,
  store: CheckpointStore,
  opts: { verify?: VerifyOptions; onProgress?: (line: string) => void } = {},
): Promise<{ ckpt: StoredCheckpoint; bytes: number; pulled: string[]; fromServers: Record<string, number> }> {
  const local = new Set(store.list().map((c) => c.id));
  const pulled: string[] = [];
  const fromServers: Record<string, number> = {};
  let bytes = 0;
  const fetch = async (want: string): Promise<StoredCheckpoint> => {
    if (local.has(want)) return store.resolve(want);
    // The manifest names the parent; fetch it first so this one verifies against its chain.
    const manifest = openManifest(
      (await servers.getBlob(want, MANIFEST_FILE)).toString('utf8'),
      `checkpoint ${want} on the memory servers`,
    );
    if (manifest.parent) await fetch(manifest.parent);
    const r = await pullCheckpoint(want, servers, store, opts);
    pulled.push(want);
    bytes += r.bytes;
    for (const [url, n] of Object.entries(r.fromServers)) fromServers[url] = (fromServers[url] ?? 0) + n;
    return r.ckpt;
  };
  const ckpt = await fetch(id);
  return { ckpt, bytes, pulled, fromServers };
}

/**
 * Fetches checkpoint `id` from the servers into the local store (every extent from whichever
 * replica has a valid copy), verifies it and publishes it. Returns the stored checkpoint.
 */
export async function pullCheckpoint(
  id: string,
  servers: ServerSet,
  store: CheckpointStore,
  opts: { verify?: VerifyOptions; onProgress?: (line: string) => void } = {},
): Promise<{ ckpt: StoredCheckpoint; bytes: number; fromServers: Record<string, number> }> {
  const index = parseIndex(await servers.getBlob(id, INDEX_BLOB), id);
  const staging = store.stage(id);
  const fromServers: Record<string, number> = {};
  let bytes = 0;
  try {
    for (const f of index.files) {
      const file = path.join(staging, f.name);
      if (f.extents === undefined) {
        const data = await servers.getBlob(id, f.name);
        if (data.length !== f.size)
          throw new CheckpointError(
            `${f.name} of ${id}: the servers hold ${data.length} bytes, the index says ${f.size}`,
          );
        fs.writeFileSync(file, data, { mode: 0o600 });
        bytes += data.length;
        continue;
      }
      const fd = fs.openSync(file, 'w', 0o600);
      try {
        fs.ftruncateSync(fd, f.size);
        const present = f.extents;
        await pool(present.length, async (i) => {
          const k = present[i] as number;
          const e = await servers.getExtent(id, f.name, k);
          if (e.offset !== k * EXTENT_BYTES || e.offset + e.data.length > f.size)
            throw new CheckpointError(
              `${f.name}[${k}] of ${id}: extent at ${e.offset} lies outside the file`,
            );
          fs.writeSync(fd, e.data, 0, e.data.length, e.offset);
          bytes += e.data.length;
          fromServers[e.from] = (fromServers[e.from] ?? 0) + 1;
        });
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      opts.onProgress?.(`${f.name}: ${f.extents.length} extents received`);
    }
    // Nothing from the network is trusted: the manifest must read and every file match it.
    const manifest = openManifest(
      fs.readFileSync(path.join(staging, MANIFEST_FILE), 'utf8'),
      `checkpoint ${id} from the memory servers`,
    );
    if (manifest.id !== id)
      throw new CheckpointError(`the servers' ${id} holds a manifest for ${manifest.id}`);
    assertVerified(verifyCheckpoint({ id, dir: staging, manifest }, true, opts.verify));
    const dir = store.publish(staging, id);
    return { ckpt: { id, dir, manifest: readManifest(dir) }, bytes, fromServers };
  } catch (err) {
    store.discard(staging);
    throw err;
  }
}
