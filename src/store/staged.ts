import type { ManifestBlock } from './manifest.js';

/**
 * The store side of a checkpoint being taken: where the receiver's pages go. The local store
 * (local-writer.ts) is one implementation; a memory server is another. The interface is page- and
 * extent-shaped so a remote writer can ship 1 MiB extents aligned with the per-MiB sums.
 */
export interface BlockSpec {
  name: string;
  usedLength: number;
}

/** One RAM block's pages. Offsets are page-aligned; a later write of a page replaces the earlier. */
export interface BlockWriter {
  readonly length: number;
  /** Copies the page at `src[from, from + PAGE_SIZE)`; `src` may be reused once this returns. */
  writePage(offset: number, src: Buffer, from: number): void;
  /** A page of one byte value (QEMU's "zero page" record carries the byte). */
  fillPage(offset: number, value: number): void;
  /** Reads `len` bytes at `offset` as they stand now (XBZRLE deltas; the TCG fix-up). */
  read(offset: number, into: Buffer, len: number): void;
}

export interface BlobInfo {
  file: string;
  bytes: number;
  sha256: string;
}

/** What `finish` leaves for the manifest. */
export interface FinishedRam {
  blocks: ManifestBlock[];
  /** The checkpoint this one's RAM builds on (pages not stored are its), when incremental. */
  parent?: string;
  /** Allocated bytes of every file written, blobs included. */
  bytesStored: number;
}

export interface StagedCheckpoint {
  /** Opens the stream's RAM blocks (once, in the stream's order); writers index like `blocks`. */
  openBlocks(blocks: readonly BlockSpec[]): BlockWriter[];
  /** Stores a small file durably (config.bin, device.bin). */
  putBlob(file: string, data: Buffer): BlobInfo;
  /**
   * Makes every block durable with its sums and page hashes; an incremental store keeps only
   * what differs from the parent. After this the staging holds exactly the files to publish.
   */
  finish(): Promise<FinishedRam>;
  /** Releases descriptors of a checkpoint that will not be finished (the files go with staging). */
  abandon(): void;
}
