/**
 * Sub-page deltas: a page stored as its XOR with the parent's version, run-length encoded. Pages
 * a guest changes by a few bytes (a counter, a flag) shrink from 4096 bytes to a handful.
 *
 * Encoding: a sequence of (skip, count, count bytes) records; `skip` and `count` are ULEB128
 * (as in QEMU's XBZRLE). `skip` bytes are unchanged (XOR zero); the `count` bytes that follow
 * are XORed into the page. The encoder gives up (returns -1) as soon as the delta would not be
 * smaller than `limit`, so the caller stores the full page instead.
 *
 * The decoder takes hostile input: every length is checked against the page and the input, it
 * allocates nothing, and any malformed delta throws.
 */
import { TlcError } from '../core/errors.js';

/** Longest ULEB128 for a page offset (values below 2^21). */
const MAX_ULEB_BYTES = 3;

function ulebBytes(v: number): number {
  return v < 0x80 ? 1 : v < 0x4000 ? 2 : 3;
}

function putUleb(out: Buffer, at: number, v: number): number {
  while (v >= 0x80) {
    out[at++] = (v & 0x7f) | 0x80;
    v >>>= 7;
  }
  out[at++] = v;
  return at;
}

/**
 * Encodes `cur[curAt, curAt+size)` against `prev[prevAt, ...)` into `out[outAt, ...)`. Returns the
 * encoded length, or -1 when it would be `limit` bytes or more (a full page is then cheaper).
 * `out` must have room for `limit` bytes at `outAt`. No allocation.
 */
export function encodeXorDelta(
  cur: Buffer,
  curAt: number,
  prev: Buffer,
  prevAt: number,
  size: number,
  out: Buffer,
  outAt: number,
  limit: number,
): number {
  let o = outAt;
  let i = 0;
  while (i < size) {
    const skipFrom = i;
    while (i < size && cur[curAt + i] === prev[prevAt + i]) i++;
    if (i === size) break; // trailing unchanged bytes need no record
    const skip = i - skipFrom;
    const litFrom = i;
    // A literal run ends at the first unchanged stretch long enough to pay for a new record.
    while (i < size) {
      if (cur[curAt + i] !== prev[prevAt + i]) {
        i++;
        continue;
      }
      let same = i;
      while (same < size && same - i < 4 && cur[curAt + same] === prev[prevAt + same]) same++;
      if (same === size || same - i >= 4) break;
      i = same;
    }
    const count = i - litFrom;
    if (o - outAt + ulebBytes(skip) + ulebBytes(count) + count >= limit) return -1;
    o = putUleb(out, o, skip);
    o = putUleb(out, o, count);
    for (let k = 0; k < count; k++)
      out[o++] = (cur[curAt + litFrom + k] as number) ^ (prev[prevAt + litFrom + k] as number);
  }
  return o - outAt;
}

/**
 * Applies a delta to `page[pageAt, pageAt+size)` in place (the parent's page becomes the child's).
 * Throws E_CORRUPT on a malformed delta, touching no byte outside the page and reading none
 * outside `delta[deltaAt, deltaAt+deltaLen)`.
 */
export function applyXorDelta(
  page: Buffer,
  pageAt: number,
  size: number,
  delta: Buffer,
  deltaAt: number,
  deltaLen: number,
): void {
  if (
    deltaAt < 0 ||
    deltaLen < 0 ||
    deltaAt + deltaLen > delta.length ||
    pageAt < 0 ||
    pageAt + size > page.length
  ) {
    throw new TlcError('E_CORRUPT', 'sub-page delta: bounds outside the buffers');
  }
  const end = deltaAt + deltaLen;
  let d = deltaAt;
  let p = 0;
  const readUleb = (): number => {
    let v = 0;
    for (let n = 0; n < MAX_ULEB_BYTES; n++) {
      if (d >= end) throw new TlcError('E_CORRUPT', 'sub-page delta: truncated length');
      const b = delta[d++] as number;
      v |= (b & 0x7f) << (7 * n);
      if ((b & 0x80) === 0) return v;
    }
    throw new TlcError('E_CORRUPT', 'sub-page delta: length too long');
  };
  while (d < end) {
    const skip = readUleb();
    const count = readUleb();
    if (count === 0) throw new TlcError('E_CORRUPT', 'sub-page delta: empty record');
    if (skip > size - p || count > size - p - skip) {
      throw new TlcError('E_CORRUPT', 'sub-page delta: record runs past the end of the page');
    }
    if (count > end - d) throw new TlcError('E_CORRUPT', 'sub-page delta: truncated record');
    p += skip;
    for (let k = 0; k < count; k++)
      page[pageAt + p + k] = (page[pageAt + p + k] as number) ^ (delta[d + k] as number);
    p += count;
    d += count;
  }
}
