import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { TlcError } from '../core/errors.js';
import { SUMS_CHUNK_BYTES, SUMS_MAGIC } from './manifest.js';

/**
 * Per-chunk SHA-256 of a RAM image. Layout of a sums file:
 *
 * | offset | size     | field                                         |
 * |--------|----------|-----------------------------------------------|
 * | 0      | 8        | magic `TLCSUMS1`                              |
 * | 8      | be32     | chunk size in bytes                           |
 * | 12     | be32     | chunk count                                   |
 * | 16     | 32*count | SHA-256 per chunk; 32 zero bytes = all-zero chunk |
 */
const HEADER_BYTES = 16;
const HASH_BYTES = 32;
const ZERO_CHUNK = Buffer.alloc(SUMS_CHUNK_BYTES);

export function chunkCount(length: number): number {
  return Math.ceil(length / SUMS_CHUNK_BYTES);
}

/** Hashes one chunk into `out` at `index`; all-zero chunks get the zero marker (no hashing). */
export function hashChunk(chunk: Buffer, out: Buffer, index: number): void {
  const at = HEADER_BYTES + index * HASH_BYTES;
  if (ZERO_CHUNK.compare(chunk, 0, chunk.length, 0, chunk.length) === 0) {
    out.fill(0, at, at + HASH_BYTES);
    return;
  }
  createHash('sha256').update(chunk).digest().copy(out, at);
}

export function newSums(length: number): Buffer {
  const count = chunkCount(length);
  const sums = Buffer.alloc(HEADER_BYTES + count * HASH_BYTES);
  sums.write(SUMS_MAGIC, 0, 'latin1');
  sums.writeUInt32BE(SUMS_CHUNK_BYTES, 8);
  sums.writeUInt32BE(count, 12);
  return sums;
}

/** Checks an image file against its sums; returns the index of each damaged chunk. */
export function verifyImage(imageFile: string, sumsFile: string, length: number): number[] {
  const sums = fs.readFileSync(sumsFile);
  if (sums.toString('latin1', 0, 8) !== SUMS_MAGIC) throw new TlcError('E_CORRUPT', `${sumsFile}: bad magic`);
  const count = sums.readUInt32BE(12);
  if (
    sums.readUInt32BE(8) !== SUMS_CHUNK_BYTES ||
    count !== chunkCount(length) ||
    sums.length !== HEADER_BYTES + count * HASH_BYTES
  ) {
    throw new TlcError('E_CORRUPT', `${sumsFile}: does not describe a ${length}-byte image`);
  }
  const size = fs.statSync(imageFile).size;
  if (size !== length) throw new TlcError('E_CORRUPT', `${imageFile}: ${size} bytes, expected ${length}`);
  const bad: number[] = [];
  const actual = newSums(length);
  const chunk = Buffer.allocUnsafe(SUMS_CHUNK_BYTES);
  const fd = fs.openSync(imageFile, 'r');
  try {
    for (let i = 0; i < count; i++) {
      const len = Math.min(SUMS_CHUNK_BYTES, length - i * SUMS_CHUNK_BYTES);
      const n = fs.readSync(fd, chunk, 0, len, i * SUMS_CHUNK_BYTES);
      const view = chunk.subarray(0, n);
      hashChunk(view, actual, i);
      const at = HEADER_BYTES + i * HASH_BYTES;
      if (actual.compare(sums, at, at + HASH_BYTES, at, at + HASH_BYTES) !== 0) bad.push(i);
    }
  } finally {
    fs.closeSync(fd);
  }
  return bad;
}
