/**
 * XBZRLE page deltas (migration/xbzrle.c), applied by the receiver to its current copy of a page.
 */
import { StreamError } from '../core/errors.js';

/**
 * Apply an XBZRLE delta to `target` (one page, in place). Delta grammar: pairs of ULEB128 `skip`
 * (unchanged bytes) and `count` (literal bytes that follow), each ≤ 0x3FFF and at most 2 bytes;
 * `count` ≥ 1; `skip` is 0 only in the first pair; the position never passes the page end.
 * `offset` is the stream offset of the record, for errors. Throws StreamError.
 */
export function applyXbzrle(target: Buffer, delta: Buffer, offset: number): void {
  const end = target.length;
  let d = 0;
  let t = 0;
  let first = true;
  while (d < delta.length) {
    // skip
    let b = delta[d++] as number;
    let skip = b & 0x7f;
    if (b & 0x80) {
      if (d >= delta.length) throw new StreamError('XBZRLE delta truncated in a skip length', offset);
      b = delta[d++] as number;
      if (b & 0x80) throw new StreamError('XBZRLE skip length longer than 2 bytes', offset);
      skip |= b << 7;
    }
    if (skip === 0 && !first) throw new StreamError('XBZRLE zero skip after the first run', offset);
    first = false;
    t += skip;
    // count
    if (d >= delta.length) throw new StreamError('XBZRLE delta truncated before a literal count', offset);
    b = delta[d++] as number;
    let count = b & 0x7f;
    if (b & 0x80) {
      if (d >= delta.length) throw new StreamError('XBZRLE delta truncated in a literal count', offset);
      b = delta[d++] as number;
      if (b & 0x80) throw new StreamError('XBZRLE literal count longer than 2 bytes', offset);
      count |= b << 7;
    }
    if (count === 0) throw new StreamError('XBZRLE literal run of length 0', offset);
    if (t + count > end || d + count > delta.length) {
      throw new StreamError('XBZRLE run passes the end of the page or the delta', offset);
    }
    delta.copy(target, t, d, d + count);
    d += count;
    t += count;
  }
}
