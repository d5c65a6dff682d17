import fs from 'node:fs';
import path from 'node:path';
import { TlcError } from '../core/errors.js';
import { type ManifestBlock, PAGE_SIZE, SUMS_CHUNK_BYTES, checkpointFilePath } from './manifest.js';
import { HASHES_HEADER_BYTES, HASH_BYTES, ZERO_HASH, checkHashesHeader, hashPages } from './page-hash.js';
import type { BlockSpec } from './staged.js';
import type { StoredCheckpoint } from './store.js';
import { chunkCount } from './sums.js';
import { readFull } from './fileio.js';
import { DeltaIndex } from './delta-file.js';
import { applyXorDelta } from './xor-delta.js';

/** Longest RAM chain followed before a manifest is taken to be cyclic. */
const MAX_CHAIN = 1000;
const PAGES_PER_CHUNK = SUMS_CHUNK_BYTES / PAGE_SIZE;

/** Whether `parent` can be the parent of a checkpoint of these blocks: same blocks, with page hashes. */
export function compatibleParent(parent: StoredCheckpoint, blocks: readonly BlockSpec[]): boolean {
  const pb = parent.manifest.blocks;
  return (
    pb.length === blocks.length &&
    blocks.every(
      (b, i) =>
        pb[i]?.name === b.name && pb[i]?.usedLength === b.usedLength && pb[i]?.hashesFile !== undefined,
    )
  );
}

/**
 * `ckpt` and the checkpoints its RAM builds on, newest first, down to a full one. Throws E_CORRUPT
 * naming the link when a parent is missing, damaged, or does not describe the same blocks.
 */
export function ramChain(ckpt: StoredCheckpoint, load: (id: string) => StoredCheckpoint): StoredCheckpoint[] {
  const chain = [ckpt];
  let cur = ckpt;
  while (cur.manifest.parent !== undefined) {
    const id = cur.manifest.parent;
    if (chain.some((c) => c.id === id) || chain.length > MAX_CHAIN) {
      throw new TlcError('E_CORRUPT', `${ckpt.id}: its chain of parents loops at ${id}`);
    }
    let parent: StoredCheckpoint;
    try {
      parent = load(id);
    } catch (err) {
      throw new TlcError(
        'E_CORRUPT',
        `${ckpt.id} builds on ${id}${cur === ckpt ? '' : ` (through ${cur.id})`}, which cannot be read: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
    if (!compatibleParent(parent, cur.manifest.blocks)) {
      throw new TlcError('E_CORRUPT', `${cur.id} builds on ${id}, whose RAM blocks do not match`);
    }
    chain.push(parent);
    cur = parent;
  }
  return chain;
}

/**
 * Reads one block as a chain of checkpoints holds it, 1 MiB at a time: a page is the newest
 * version (the first checkpoint, from the newest, whose hash differs from its parent's holds it).
 * Memory: one chunk and one hash slice per checkpoint in the chain.
 */
export class ChainBlockReader {
  readonly length: number;
  private readonly fds: number[] = [];
  private readonly hfds: number[] = [];
  private readonly files: string[] = [];
  /** Per checkpoint: this chunk's page hashes. */
  readonly hashes: BigUint64Array[];
  private readonly hashBufs: Buffer[];
  private readonly check = new BigUint64Array(PAGES_PER_CHUNK);
  /** Per checkpoint: its sub-page deltas, if it has any. */
  private readonly deltas: (DeltaIndex | undefined)[] = [];
  private readonly deltaBuf = Buffer.allocUnsafe(PAGE_SIZE);

  constructor(
    private readonly chain: readonly StoredCheckpoint[],
    readonly index: number,
  ) {
    const first = chain[0]?.manifest.blocks[index] as ManifestBlock;
    this.length = first.usedLength;
    this.hashes = chain.map(() => new BigUint64Array(PAGES_PER_CHUNK));
    this.hashBufs = this.hashes.map((h) => Buffer.from(h.buffer));
    try {
      for (const c of chain) {
        const b = c.manifest.blocks[index] as ManifestBlock;
        const file = checkpointFilePath(c.dir, b.file);
        this.files.push(file);
        this.fds.push(fs.openSync(file, 'r'));
        if (chain.length > 1) {
          const hfile = checkpointFilePath(c.dir, b.hashesFile ?? '');
          const hfd = fs.openSync(hfile, 'r');
          this.hfds.push(hfd);
          const header = Buffer.alloc(HASHES_HEADER_BYTES);
          readFull(hfd, header, HASHES_HEADER_BYTES, 0, hfile);
          checkHashesHeader(header, this.length, hfile);
        }
        this.deltas.push(
          b.deltaFile !== undefined && b.deltaBytes !== undefined
            ? DeltaIndex.open(
                checkpointFilePath(c.dir, b.deltaFile),
                b.deltaBytes,
                Math.ceil(this.length / PAGE_SIZE),
              )
            : undefined,
        );
      }
    } catch (err) {
      this.close();
      throw err;
    }
  }

  get chunks(): number {
    return chunkCount(this.length);
  }

  /** Fills `out[0, len)` with chunk `c` and returns len. The newest hashes are `hashes[0]`. */
  readChunk(c: number, out: Buffer): number {
    const at = c * SUMS_CHUNK_BYTES;
    const len = Math.min(SUMS_CHUNK_BYTES, this.length - at);
    if (this.chain.length === 1) {
      readFull(this.fds[0] as number, out, len, at, this.files[0] as string);
      return len;
    }
    const pages = Math.ceil(len / PAGE_SIZE);
    for (let k = 0; k < this.chain.length; k++) {
      const file = this.files[k] as string;
      const hashAt = HASHES_HEADER_BYTES + c * PAGES_PER_CHUNK * HASH_BYTES;
      readFull(this.hfds[k] as number, this.hashBufs[k] as Buffer, pages * HASH_BYTES, hashAt, file);
    }
    out.fill(0, 0, len);
    const newest = this.hashes[0] as BigUint64Array;
    let runOwner = -1;
    let runFrom = 0;
    const firstPage = c * PAGES_PER_CHUNK;
    for (let p = 0; p <= pages; p++) {
      let owner = p < pages && newest[p] !== ZERO_HASH ? this.ownerFrom(p, 0) : -1;
      // A page kept as a sub-page delta is built on its own: the parent's version, then the XOR.
      if (owner >= 0 && (this.deltas[owner]?.find(firstPage + p) ?? -1) >= 0) owner = -2;
      if (owner === runOwner && owner !== -2) continue;
      if (runOwner >= 0) {
        const from = runFrom * PAGE_SIZE;
        const file = this.files[runOwner] as string;
        readFull(
          this.fds[runOwner] as number,
          out.subarray(from),
          (p - runFrom) * PAGE_SIZE,
          at + from,
          file,
        );
      }
      if (owner === -2) {
        this.resolvePage(p, 0, out, at);
        owner = -1;
      }
      runOwner = owner;
      runFrom = p;
    }
    // The assembled pages must hash as the newest checkpoint says: a wrong parent, a damaged
    // file or a hash collision never passes silently.
    hashPages(out, len, this.check);
    for (let p = 0; p < pages; p++) {
      if (this.check[p] !== newest[p]) {
        throw new TlcError(
          'E_CORRUPT',
          `${this.chain[0]?.id}: page at 0x${(at + p * PAGE_SIZE).toString(16)} of block ${this.index} assembled from its chain does not match its page hash`,
        );
      }
    }
    return len;
  }

  /** The first checkpoint from `k` on (towards the oldest) that holds page `p` of this chunk. */
  private ownerFrom(p: number, k: number): number {
    const last = this.chain.length - 1;
    for (let j = k; j < last; j++) if (this.hashes[j]?.[p] !== this.hashes[j + 1]?.[p]) return j;
    return last;
  }

  /** Page `p` of this chunk as checkpoint `k` has it, into `out` at its place. */
  private resolvePage(p: number, k: number, out: Buffer, chunkAt: number): void {
    const off = p * PAGE_SIZE;
    if (k >= this.chain.length || this.hashes[k]?.[p] === ZERO_HASH) {
      out.fill(0, off, off + PAGE_SIZE);
      return;
    }
    const j = this.ownerFrom(p, k);
    const r = this.deltas[j]?.find(chunkAt / PAGE_SIZE + p) ?? -1;
    if (r < 0) {
      readFull(this.fds[j] as number, out.subarray(off), PAGE_SIZE, chunkAt + off, this.files[j] as string);
      return;
    }
    this.resolvePage(p, j + 1, out, chunkAt);
    const index = this.deltas[j] as DeltaIndex;
    const len = index.read(r, this.deltaBuf);
    applyXorDelta(out, off, PAGE_SIZE, this.deltaBuf, 0, len);
  }

  close(): void {
    for (const fd of [...this.fds, ...this.hfds]) fs.closeSync(fd);
    for (const d of this.deltas) d?.close();
    this.fds.length = 0;
    this.hfds.length = 0;
    this.deltas.length = 0;
  }
}

/**
 * Writes block `index` of `chain[0]` as one flat sparse image (what lazy restore maps): only
 * data pages are written. Returns the bytes written.
 */
export function assembleBlock(chain: readonly StoredCheckpoint[], index: number, outFile: string): number {
  const reader = new ChainBlockReader(chain, index);
  const chunk = Buffer.allocUnsafe(SUMS_CHUNK_BYTES);
  const zero = Buffer.alloc(PAGE_SIZE);
  let written = 0;
  const fd = fs.openSync(outFile, 'w', 0o600);
  try {
    fs.ftruncateSync(fd, reader.length);
    for (let c = 0; c < reader.chunks; c++) {
      const len = reader.readChunk(c, chunk);
      const at = c * SUMS_CHUNK_BYTES;
      let runFrom = -1;
      for (let p = 0; p <= len; p += PAGE_SIZE) {
        const data = p < len && zero.compare(chunk, p, p + PAGE_SIZE) !== 0;
        if (data && runFrom < 0) runFrom = p;
        if (!data && runFrom >= 0) {
          let done = 0;
          while (done < p - runFrom)
            done += fs.writeSync(fd, chunk, runFrom + done, p - runFrom - done, at + runFrom + done);
          written += p - runFrom;
          runFrom = -1;
        }
      }
    }
  } finally {
    fs.closeSync(fd);
    reader.close();
  }
  return written;
}

export function blockFile(c: StoredCheckpoint, index: number): string {
  return path.join(c.dir, (c.manifest.blocks[index] as ManifestBlock).file);
}
