import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PersistError } from '../core/errors.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';
import {
  type ManifestBlock,
  PAGE_SIZE,
  SUMS_CHUNK_BYTES,
  deltaFileName,
  hashesFileName,
  imageFileName,
  sha256Hex,
  sumsFileName,
} from './manifest.js';
import { HASH_BYTES, ZERO_HASH, hashPages, hashesHeader } from './page-hash.js';
import type { BlobInfo, BlockSpec, BlockWriter, FinishedRam, StagedCheckpoint } from './staged.js';
import type { StoredCheckpoint } from './store.js';
import { chunkCount, hashChunk, newSums } from './sums.js';
import { ChainBlockReader, compatibleParent, ramChain } from './chain.js';
import { DeltaFileWriter } from './delta-file.js';
import { encodeXorDelta } from './xor-delta.js';
import { readManifest } from './store.js';
import { type ScratchBlock, type ScratchOptions, markScratch, openScratch } from './scratch.js';
import { allocatedBytes, openNew, readFull, writeDurable, writeFull } from './fileio.js';

/** Longest run of consecutive pages gathered before one pwrite. */
const RUN_BYTES = 1024 * 1024;
const PAGES_PER_CHUNK = SUMS_CHUNK_BYTES / PAGE_SIZE;

/**
 * The local store's staged checkpoint. Pages go straight into a flat file per block through the
 * page cache (pwrite at the page's offset, later versions overwrite), so tlc holds no RAM-sized
 * table: its memory is one 1 MiB run buffer per block and, per page, one bit saying whether the
 * page was ever written (a zero page never written needs no write, the file is sparse).
 *
 * `finish` reads each block back once, 1 MiB at a time, and in that one pass finds zero pages,
 * hashes every page, drops (incremental) the pages whose hash equals the parent's, and computes the
 * per-MiB SHA-256 sums of what is kept.
 */
export interface LocalStagingOptions {
  /** Store only pages that differ from this checkpoint (when its blocks match). */
  parent?: StoredCheckpoint;
  /** Receive into the VM's recycled receive files (scratch.ts) instead of fresh ones. */
  scratch?: ScratchOptions;
  /** Store a changed page as its XOR delta against the parent's where that halves it (default on). */
  subPageDeltas?: boolean;
}

export class LocalStagedCheckpoint implements StagedCheckpoint {
  private writers: LocalBlockWriter[] = [];
  private blobs: BlobInfo[] = [];
  private parentOf: StoredCheckpoint | undefined;
  private useScratch = false;

  constructor(
    private readonly staging: string,
    private readonly opts: LocalStagingOptions = {},
  ) {}

  openBlocks(blocks: readonly BlockSpec[]): BlockWriter[] {
    // Incremental only when the parent has every block, same size, with page hashes.
    const parent = this.opts.parent;
    this.parentOf = parent && compatibleParent(parent, blocks) ? parent : undefined;
    // Always through the receive files, even when they are cold (a first checkpoint): writing a
    // full checkpoint straight into its published files saves one set of fresh pages then, but the
    // next checkpoint's stream would fill cold files instead (measured on a 4 GiB guest: 22 + 16 s
    // to durable for the first two that way, 24.5 + 3.8 s this way).
    this.useScratch = this.opts.scratch !== undefined;
    if (this.opts.scratch && this.useScratch) {
      const files = openScratch(this.opts.scratch, blocks);
      this.writers = blocks.map((b, i) => {
        const f = files[i] as ScratchBlock;
        return new LocalBlockWriter(b, f.file, f.fd, f.maybeData, false);
      });
    } else {
      this.writers = blocks.map((b, i) => {
        const final = path.join(this.staging, imageFileName(i));
        // Full: pages land in the published file directly. Incremental: in a flat staging file.
        const file = this.parentOf ? `${final}.stage` : final;
        return new LocalBlockWriter(b, file, createSized(file, b.usedLength), undefined, !this.parentOf);
      });
    }
    return this.writers;
  }

  putBlob(file: string, data: Buffer): BlobInfo {
    writeDurable(path.join(this.staging, file), data);
    const info = { file, bytes: data.length, sha256: sha256Hex(data) };
    this.blobs.push(info);
    return info;
  }

  async finish(): Promise<FinishedRam> {
    const blocks: ManifestBlock[] = [];
    let bytesStored = this.blobs.reduce((n, b) => n + b.bytes, 0);
    for (let i = 0; i < this.writers.length; i++) {
      const writer = this.writers[i] as LocalBlockWriter;
      const done = finishBlock(this.staging, i, writer, this.parentBlock(i));
      bytesStored += done.bytesStored;
      blocks.push(done.block);
      // Lets the event loop breathe between blocks (QMP events, signals).
      await new Promise((r) => setImmediate(r));
    }
    if (this.opts.scratch && this.useScratch) markScratch(this.opts.scratch.dir, this.opts.scratch.id);
    return { blocks, bytesStored, ...(this.parentOf ? { parent: this.parentOf.id } : {}) };
  }

  abandon(): void {
    for (const w of this.writers) w.close();
  }

  private parentBlock(index: number): ParentBlock | undefined {
    const parent = this.parentOf;
    if (!parent) return undefined;
    const hashesFile = parentHashesFile(parent, index);
    if (this.opts.subPageDeltas === false) return { hashesFile };
    try {
      // The parent's own parents are its siblings in the store directory.
      const storeDir = path.dirname(parent.dir);
      const chain = ramChain(parent, (id) => ({
        id,
        dir: path.join(storeDir, id),
        manifest: readManifest(path.join(storeDir, id)),
      }));
      return { hashesFile, reader: new ChainBlockReader(chain, index) };
    } catch {
      // A parent chain that cannot be read: no deltas (full pages); verify names the damage.
      return { hashesFile };
    }
  }
}

function createSized(file: string, length: number): number {
  try {
    const fd = fs.openSync(file, 'wx+', PRIVATE_FILE_MODE);
    fs.ftruncateSync(fd, length);
    return fd;
  } catch (err) {
    throw new PersistError('create', file, err);
  }
}

function parentHashesFile(parent: StoredCheckpoint, index: number): string {
  const b = parent.manifest.blocks[index] as ManifestBlock;
  return path.join(parent.dir, b.hashesFile as string);
}

export class LocalBlockWriter implements BlockWriter {
  readonly length: number;
  readonly name: string;
  /** One bit per page: the page may hold non-zero data (a zero record elsewhere costs nothing). */
  private readonly maybeData: Uint8Array;
  private readonly run = Buffer.allocUnsafe(RUN_BYTES);
  private runStart = 0;
  private runLen = 0;
  private readonly fillBuf = Buffer.alloc(PAGE_SIZE);

  constructor(
    block: BlockSpec,
    readonly file: string,
    public fd: number,
    maybeData: Uint8Array | undefined,
    /** The receive file is the file to publish (a full checkpoint without scratch). */
    readonly isFinal: boolean,
  ) {
    this.length = block.usedLength;
    this.name = block.name;
    this.maybeData = maybeData ?? new Uint8Array(Math.ceil(block.usedLength / PAGE_SIZE / 8));
  }

  writePage(offset: number, src: Buffer, from: number): void {
    if (this.runLen === 0 || offset !== this.runStart + this.runLen || this.runLen === RUN_BYTES) {
      this.flush();
      this.runStart = offset;
    }
    src.copy(this.run, this.runLen, from, from + PAGE_SIZE);
    this.runLen += PAGE_SIZE;
    const page = offset / PAGE_SIZE;
    (this.maybeData[page >>> 3] as number) |= 1 << (page & 7);
  }

  fillPage(offset: number, value: number): void {
    const page = offset / PAGE_SIZE;
    // The file reads as zeros where nothing was written: a zero page there costs nothing.
    if (value === 0 && ((this.maybeData[page >>> 3] as number) & (1 << (page & 7))) === 0) return;
    this.fillBuf.fill(value);
    this.writePage(offset, this.fillBuf, 0);
  }

  read(offset: number, into: Buffer, len: number): void {
    this.flush();
    readFull(this.fd, into, len, offset, this.file);
  }

  flush(): void {
    if (this.runLen === 0) return;
    writeFull(this.fd, this.run, this.runLen, this.runStart, this.file);
    this.runLen = 0;
  }

  close(): void {
    if (this.fd < 0) return;
    fs.closeSync(this.fd);
    this.fd = -1;
  }
}

/**
 * The one pass over a block after the stream: page hashes, the parent comparison, the copy of
 * changed pages into the final (sparse) image when incremental, and the per-MiB sums.
 */
/** The parent's side of an incremental block: its page hashes and, for deltas, its pages. */
interface ParentBlock {
  hashesFile: string;
  /** Reads the parent's content chunk by chunk (sub-page deltas); absent when deltas are off. */
  reader?: ChainBlockReader;
}

/** A delta is kept only when it at least halves the page: decoding costs a parent read at restore. */
const DELTA_LIMIT = PAGE_SIZE / 2;

/**
 * The one pass over a block after the stream: page hashes, the parent comparison, sub-page deltas,
 * the copy of kept pages into the final (sparse) image, and the per-MiB sums of that image.
 */
function finishBlock(
  staging: string,
  index: number,
  writer: LocalBlockWriter,
  parent: ParentBlock | undefined,
): { block: ManifestBlock; bytesStored: number } {
  writer.flush();
  const length = writer.length;
  const imageFile = path.join(staging, imageFileName(index));
  const sumsFile = path.join(staging, sumsFileName(index));
  const hashesFile = path.join(staging, hashesFileName(index));
  const sums = newSums(length);
  const chunk = Buffer.allocUnsafe(SUMS_CHUNK_BYTES);
  const hashes = new BigUint64Array(PAGES_PER_CHUNK);
  const hashBytes = Buffer.from(hashes.buffer);
  const parentHashes = new BigUint64Array(PAGES_PER_CHUNK);
  const parentBytes = Buffer.from(parentHashes.buffer);
  const header = hashesHeader(length);
  const hashesSha = createHash('sha256').update(header);
  const hfd = openNew(hashesFile);
  const pfd = parent ? fs.openSync(parent.hashesFile, 'r') : -1;
  const incremental = parent !== undefined;
  // Unless pages were received into the published file itself, the kept ones are copied out.
  const copying = !writer.isFinal;
  const out = copying ? openNew(imageFile) : writer.fd;
  let reader = parent?.reader;
  const deltas = reader ? new DeltaFileWriter(path.join(staging, deltaFileName(index))) : undefined;
  const parentChunk = reader ? Buffer.allocUnsafe(SUMS_CHUNK_BYTES) : undefined;
  const encoded = Buffer.allocUnsafe(DELTA_LIMIT);
  /** Per page of the chunk: 1 when its full page goes into the image. */
  const inImage = new Uint8Array(PAGES_PER_CHUNK);
  let dataPages = 0;
  let storedPages = 0;
  let deltaInfo: { bytes: number; sha256: string } | undefined;
  try {
    writeFull(hfd, header, header.length, 0, hashesFile);
    if (copying) fs.ftruncateSync(out, length);
    for (let c = 0; c < chunkCount(length); c++) {
      const at = c * SUMS_CHUNK_BYTES;
      const len = Math.min(SUMS_CHUNK_BYTES, length - at);
      const pages = Math.ceil(len / PAGE_SIZE);
      readFull(writer.fd, chunk, len, at, writer.file);
      hashPages(chunk, len, hashes);
      const hashAt = header.length + c * PAGES_PER_CHUNK * HASH_BYTES;
      if (pfd >= 0) readFull(pfd, parentBytes, pages * HASH_BYTES, hashAt, parent?.hashesFile as string);
      let parentRead = false;
      for (let p = 0; p < pages; p++) {
        inImage[p] = 0;
        const h = hashes[p] as bigint;
        if (h !== ZERO_HASH) dataPages++;
        const stored = h !== ZERO_HASH && (pfd < 0 || h !== parentHashes[p]);
        if (!stored) {
          // Unchanged since the parent, or zero: not in the image. Sums cover the image as stored.
          if (incremental) chunk.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
          continue;
        }
        storedPages++;
        if (reader && parentHashes[p] !== ZERO_HASH) {
          if (!parentRead) {
            try {
              reader.readChunk(c, parentChunk as Buffer);
              parentRead = true;
            } catch {
              // A parent that does not read back as its hashes say: no deltas against it (the
              // full pages are stored; `tlc verify` reports the parent).
              reader.close();
              reader = undefined;
            }
          }
          const n = parentRead
            ? encodeXorDelta(
                chunk,
                p * PAGE_SIZE,
                parentChunk as Buffer,
                p * PAGE_SIZE,
                PAGE_SIZE,
                encoded,
                0,
                DELTA_LIMIT,
              )
            : -1;
          if (n > 0) {
            deltas?.add(c * PAGES_PER_CHUNK + p, encoded, n);
            chunk.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
            continue;
          }
        }
        inImage[p] = 1;
      }
      if (copying) {
        for (let p = 0, runFrom = -1; p <= pages; p++) {
          if (p < pages && inImage[p] === 1) {
            if (runFrom < 0) runFrom = p;
          } else if (runFrom >= 0) {
            copyRun(out, chunk, runFrom, p, at, imageFile);
            runFrom = -1;
          }
        }
      }
      hashChunk(chunk.subarray(0, len), sums, c);
      writeFull(hfd, hashBytes, pages * HASH_BYTES, hashAt, hashesFile);
      hashesSha.update(hashBytes.subarray(0, pages * HASH_BYTES));
    }
    fs.fdatasyncSync(out);
    fs.fdatasyncSync(hfd);
    deltaInfo = deltas?.finish();
  } catch (err) {
    if (deltas && !deltaInfo) deltas.abandon();
    throw err instanceof PersistError ? err : new PersistError('write', imageFile, err);
  } finally {
    if (copying) fs.closeSync(out);
    fs.closeSync(hfd);
    if (pfd >= 0) fs.closeSync(pfd);
    reader?.close();
    writer.close();
  }
  // A flat staging copy was never made durable; it just goes. Scratch files stay for the next.
  if (copying && writer.file.endsWith('.stage')) fs.rmSync(writer.file, { force: true });
  writeDurable(sumsFile, sums);
  let bytesStored =
    allocatedBytes(imageFile) + sums.length + header.length + Math.ceil(length / PAGE_SIZE) * HASH_BYTES;
  const deltaPages = deltas?.pages ?? 0;
  if (deltas && deltaPages === 0) fs.rmSync(deltas.file);
  if (deltaInfo && deltaPages > 0) bytesStored += allocatedBytes(deltas?.file as string);
  return {
    block: {
      name: writer.name,
      usedLength: length,
      file: imageFileName(index),
      sumsFile: sumsFileName(index),
      sumsSha256: sha256Hex(sums),
      dataPages,
      hashesFile: hashesFileName(index),
      hashesSha256: hashesSha.digest('hex'),
      storedPages,
      ...(deltaInfo && deltaPages > 0
        ? {
            deltaFile: deltaFileName(index),
            deltaSha256: deltaInfo.sha256,
            deltaBytes: deltaInfo.bytes,
            deltaPages,
          }
        : {}),
    },
    bytesStored,
  };
}

function copyRun(
  out: number,
  chunk: Buffer,
  fromPage: number,
  toPage: number,
  at: number,
  file: string,
): void {
  const from = fromPage * PAGE_SIZE;
  writeFull(out, chunk.subarray(from), (toPage - fromPage) * PAGE_SIZE, at + from, file);
}
