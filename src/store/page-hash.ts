import xxhash from 'xxhash-wasm';
import { TlcError } from '../core/errors.js';
import { PAGE_SIZE } from './manifest.js';

/**
 * Per-page content hashes of a RAM block: what an incremental checkpoint compares against its
 * parent's to store only changed pages. A hashes file:
 *
 * | offset | size     | field                                             |
 * |--------|----------|---------------------------------------------------|
 * | 0      | 8        | magic `TLCPH001`                                  |
 * | 8      | be32     | page size                                          |
 * | 12     | be32     | page count                                         |
 * | 16     | 8*count  | little-endian u64 xxh64 per page; 0 = all-zero page |
 *
 * xxh64 (xxhash-wasm): 6.3 GB/s per core here against 1.25 GB/s for node:crypto's sha1, and a
 * page needs no object but its view. A 64-bit hash decides "unchanged" with a collision chance of
 * about 2^-64 per page; the per-MiB SHA-256 sums still guard each stored file's bytes.
 */
export const HASHES_MAGIC = 'TLCPH001';
export const HASHES_HEADER_BYTES = 16;
export const HASH_BYTES = 8;
/** Hash of an all-zero page. A data page whose xxh64 is 0 is recorded as 1, so 0 stays "zero". */
export const ZERO_HASH = 0n;

const { h64Raw } = await xxhash();
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

export function hashesFileBytes(length: number): number {
  return HASHES_HEADER_BYTES + HASH_BYTES * Math.ceil(length / PAGE_SIZE);
}

export function hashesHeader(length: number): Buffer {
  const h = Buffer.alloc(HASHES_HEADER_BYTES);
  h.write(HASHES_MAGIC, 0, 'latin1');
  h.writeUInt32BE(PAGE_SIZE, 8);
  h.writeUInt32BE(Math.ceil(length / PAGE_SIZE), 12);
  return h;
}

/** Throws E_CORRUPT unless `header` describes a `length`-byte block. */
export function checkHashesHeader(header: Buffer, length: number, where: string): void {
  if (
    header.length < HASHES_HEADER_BYTES ||
    header.toString('latin1', 0, 8) !== HASHES_MAGIC ||
    header.readUInt32BE(8) !== PAGE_SIZE ||
    header.readUInt32BE(12) !== Math.ceil(length / PAGE_SIZE)
  ) {
    throw new TlcError('E_CORRUPT', `${where}: not a page-hash file for a ${length}-byte block`);
  }
}

/**
 * Hashes the pages of `chunk[0, len)` into `out[0..]` (len a multiple of the page size). Zero
 * pages are found by a memcmp, which is faster than hashing them.
 */
export function hashPages(chunk: Buffer, len: number, out: BigUint64Array): void {
  for (let at = 0, i = 0; at < len; at += PAGE_SIZE, i++) {
    if (ZERO_PAGE.compare(chunk, at, at + PAGE_SIZE) === 0) {
      out[i] = ZERO_HASH;
      continue;
    }
    const h = h64Raw(chunk.subarray(at, at + PAGE_SIZE));
    out[i] = h === ZERO_HASH ? 1n : h;
  }
}
