/**
 * The receiver's page table for one large RAM block: one slot per guest page, holding only the
 * newest version of that page, plus a dirty bitmap the writer thread drains. Both live in
 * SharedArrayBuffers so the writer persists pages while the stream is still arriving, without
 * copying them across threads. Untouched slots cost no memory (the OS maps zero pages lazily).
 *
 * Ordering contract: the receiver copies a page, then sets its dirty bit; the writer clears the
 * bit, then reads the page. A page rewritten while being written is therefore written again.
 */
export const SEGMENT_BYTES = 1024 * 1024 * 1024;
const RECONCILE_CHUNK_BYTES = 4 * 1024 * 1024;

export interface PageTableShared {
  length: number;
  pageSize: number;
  segments: SharedArrayBuffer[];
  dirty: SharedArrayBuffer;
}

export class PageTable {
  readonly length: number;
  readonly pageSize: number;
  readonly segments: Buffer[];
  readonly dirty: Int32Array;
  readonly shared: PageTableShared;
  private readonly zero: Buffer;

  constructor(length: number, pageSize: number, shared?: PageTableShared) {
    this.length = length;
    this.pageSize = pageSize;
    const pages = Math.ceil(length / pageSize);
    this.shared = shared ?? {
      length,
      pageSize,
      segments: segmentSizes(length).map((size) => new SharedArrayBuffer(size)),
      dirty: new SharedArrayBuffer(Math.ceil(pages / 32) * 4),
    };
    this.segments = this.shared.segments.map((sab) => Buffer.from(sab));
    this.dirty = new Int32Array(this.shared.dirty);
    this.zero = Buffer.alloc(pageSize);
  }

  private segment(offset: number): Buffer {
    return this.segments[Math.floor(offset / SEGMENT_BYTES)] as Buffer;
  }

  private markDirty(offset: number): void {
    const page = offset / this.pageSize;
    Atomics.or(this.dirty, page >>> 5, 1 << (page & 31));
  }

  writePage(offset: number, data: Buffer): void {
    data.copy(this.segment(offset), offset % SEGMENT_BYTES, 0, this.pageSize);
    this.markDirty(offset);
  }

  /** A page of one byte value. Zero pages that already read as zero cost nothing. */
  fillPage(offset: number, fill: number): void {
    const seg = this.segment(offset);
    const at = offset % SEGMENT_BYTES;
    if (fill === 0 && this.zero.compare(seg, at, at + this.pageSize) === 0) return;
    seg.fill(fill, at, at + this.pageSize);
    this.markDirty(offset);
  }

  /** A view of one page, for in-place updates (XBZRLE); call `touched` after changing it. */
  pageView(offset: number): Buffer {
    const at = offset % SEGMENT_BYTES;
    return this.segment(offset).subarray(at, at + this.pageSize);
  }

  touched(offset: number): void {
    this.markDirty(offset);
  }

  /**
   * Makes the table equal to `source` (the stopped guest's own RAM), page by page, and returns
   * how many pages differed. `read` fills `scratch` with `len` bytes at `offset`.
   */
  reconcile(read: (scratch: Buffer, offset: number, len: number) => void): number {
    const scratch = Buffer.allocUnsafe(RECONCILE_CHUNK_BYTES);
    let differing = 0;
    for (let base = 0; base < this.length; base += RECONCILE_CHUNK_BYTES) {
      const len = Math.min(RECONCILE_CHUNK_BYTES, this.length - base);
      read(scratch, base, len);
      const seg = this.segment(base);
      const segBase = base % SEGMENT_BYTES;
      if (scratch.compare(seg, segBase, segBase + len, 0, len) === 0) continue;
      for (let at = 0; at < len; at += this.pageSize) {
        if (scratch.compare(seg, segBase + at, segBase + at + this.pageSize, at, at + this.pageSize) === 0)
          continue;
        scratch.copy(seg, segBase + at, at, at + this.pageSize);
        this.markDirty(base + at);
        differing++;
      }
    }
    return differing;
  }
}

function segmentSizes(length: number): number[] {
  const sizes: number[] = [];
  for (let left = length; left > 0; left -= SEGMENT_BYTES) sizes.push(Math.min(left, SEGMENT_BYTES));
  return sizes;
}
