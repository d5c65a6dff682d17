/**
 * ByteQueue: the input side of the incremental parsers. Chunks are queued as given (no copy);
 * callers peek at fixed positions ahead of the read head and then consume whole records.
 * `take(n)` returns a `subarray` view when the bytes lie in one chunk and copies into a reusable
 * scratch buffer only when they span chunks, so the returned view is valid until the next `take`.
 */
const EMPTY = Buffer.alloc(0);

export class ByteQueue {
  /** Bytes available (queued and not yet consumed). */
  length = 0;
  private cur: Buffer = EMPTY;
  private head = 0;
  /** Chunks after `cur`, oldest first; `rest[restStart]` is the next one. */
  private rest: Buffer[] = [];
  private restStart = 0;
  private scratch: Buffer = Buffer.allocUnsafe(8192);

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.length === 0) {
      this.cur = chunk;
      this.head = 0;
    } else {
      this.rest.push(chunk);
    }
    this.length += chunk.length;
  }

  /** Byte at `i` ahead of the head; requires i < length. */
  u8(i: number): number {
    const at = this.head + i;
    if (at < this.cur.length) return this.cur[at] as number;
    return this.slowU8(at - this.cur.length);
  }

  private slowU8(i: number): number {
    for (let k = this.restStart; k < this.rest.length; k++) {
      const c = this.rest[k] as Buffer;
      if (i < c.length) return c[i] as number;
      i -= c.length;
    }
    throw new RangeError('ByteQueue: peek beyond the available bytes');
  }

  /** be16 at `i` ahead of the head; requires i + 2 <= length. */
  u16(i: number): number {
    const at = this.head + i;
    if (at + 2 <= this.cur.length) return this.cur.readUInt16BE(at);
    return (this.u8(i) << 8) | this.u8(i + 1);
  }

  /** be32 at `i` ahead of the head (unsigned); requires i + 4 <= length. */
  u32(i: number): number {
    const at = this.head + i;
    if (at + 4 <= this.cur.length) return this.cur.readUInt32BE(at);
    return ((this.u8(i) << 24) | (this.u8(i + 1) << 16) | (this.u8(i + 2) << 8) | this.u8(i + 3)) >>> 0;
  }

  /** Do the `n` bytes at `i` ahead equal `bytes`? Requires i + n <= length. */
  equals(i: number, bytes: Buffer): boolean {
    const at = this.head + i;
    const n = bytes.length;
    if (at + n <= this.cur.length) return this.cur.compare(bytes, 0, n, at, at + n) === 0;
    for (let k = 0; k < n; k++) if (this.u8(i + k) !== bytes[k]) return false;
    return true;
  }

  /** Consume `n` bytes; the view is valid until the next call of take(). */
  take(n: number): Buffer {
    const at = this.head;
    if (at + n <= this.cur.length) {
      const v = this.cur.subarray(at, at + n);
      this.advance(n);
      return v;
    }
    if (this.scratch.length < n) this.scratch = Buffer.allocUnsafe(Math.max(n, this.scratch.length * 2));
    this.copyOut(this.scratch, 0, n);
    return this.scratch.subarray(0, n);
  }

  /** Consume `n` bytes into `target` at `targetStart`. */
  copyOut(target: Buffer, targetStart: number, n: number): void {
    if (n > this.length) throw new RangeError('ByteQueue: consume beyond the available bytes');
    let done = 0;
    while (done < n) {
      const step = Math.min(n - done, this.cur.length - this.head);
      this.cur.copy(target, targetStart + done, this.head, this.head + step);
      done += step;
      this.advance(step);
    }
  }

  /** Consume `n` bytes without looking at them. */
  skip(n: number): void {
    if (n > this.length) throw new RangeError('ByteQueue: consume beyond the available bytes');
    while (n > 0) {
      const step = Math.min(n, this.cur.length - this.head);
      this.advance(step);
      n -= step;
    }
  }

  private advance(n: number): void {
    if (n > this.length) throw new RangeError('ByteQueue: consume beyond the available bytes');
    this.head += n;
    this.length -= n;
    while (this.head >= this.cur.length) {
      if (this.restStart >= this.rest.length) {
        this.cur = EMPTY;
        this.head = 0;
        this.rest.length = 0;
        this.restStart = 0;
        return;
      }
      this.head -= this.cur.length;
      this.cur = this.rest[this.restStart] as Buffer;
      this.rest[this.restStart++] = EMPTY;
      if (this.restStart > 1024 && this.restStart * 2 > this.rest.length) {
        this.rest = this.rest.slice(this.restStart);
        this.restStart = 0;
      }
    }
  }
}
