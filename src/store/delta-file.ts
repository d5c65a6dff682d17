import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { TlcError } from '../core/errors.js';
import { openNew, readFull, writeFull } from './fileio.js';
import { PAGE_SIZE } from './manifest.js';

/**
 * A block's sub-page deltas (`block-<n>.img.delta`): records in ascending page order,
 *
 * | size | field                                        |
 * |------|----------------------------------------------|
 * | 4    | le32 page index in the block                 |
 * | 2    | le16 delta length (1..4095)                  |
 * | n    | the delta (xor-delta.ts)                     |
 *
 * The file is small by construction (a record is kept only when it saves at least half a page),
 * so a reader indexes all of it up front.
 */
const RECORD_HEADER = 6;
const WRITE_BUFFER_BYTES = 256 * 1024;

export class DeltaFileWriter {
  private readonly fd: number;
  private readonly buf = Buffer.allocUnsafe(WRITE_BUFFER_BYTES);
  private used = 0;
  private written = 0;
  private readonly sha = createHash('sha256');
  pages = 0;

  constructor(readonly file: string) {
    this.fd = openNew(file);
  }

  add(page: number, delta: Buffer, len: number): void {
    if (this.used + RECORD_HEADER + len > this.buf.length) this.flush();
    this.buf.writeUInt32LE(page, this.used);
    this.buf.writeUInt16LE(len, this.used + 4);
    delta.copy(this.buf, this.used + RECORD_HEADER, 0, len);
    this.used += RECORD_HEADER + len;
    this.pages++;
  }

  private flush(): void {
    if (this.used === 0) return;
    writeFull(this.fd, this.buf, this.used, this.written, this.file);
    this.sha.update(this.buf.subarray(0, this.used));
    this.written += this.used;
    this.used = 0;
  }

  /** Makes the file durable; returns its size and SHA-256. */
  finish(): { bytes: number; sha256: string } {
    this.flush();
    fs.fdatasyncSync(this.fd);
    fs.closeSync(this.fd);
    return { bytes: this.written, sha256: this.sha.digest('hex') };
  }

  abandon(): void {
    fs.closeSync(this.fd);
  }
}

/** Where each delta of a block is: page indices ascending, with file offset and length. */
export class DeltaIndex {
  private constructor(
    private readonly pages: Uint32Array,
    private readonly offsets: Float64Array,
    private readonly lens: Uint16Array,
    private readonly fd: number,
    private readonly file: string,
  ) {}

  /** Reads and checks the whole file: sizes, page order and range. Throws E_CORRUPT. */
  static open(file: string, bytes: number, blockPages: number): DeltaIndex {
    const fd = fs.openSync(file, 'r');
    try {
      const size = fs.fstatSync(fd).size;
      if (size !== bytes) throw new TlcError('E_CORRUPT', `${file}: ${size} bytes, expected ${bytes}`);
      const data = Buffer.allocUnsafe(size);
      readFull(fd, data, size, 0, file);
      const maxRecords = Math.floor(size / (RECORD_HEADER + 1));
      const pages = new Uint32Array(maxRecords);
      const offsets = new Float64Array(maxRecords);
      const lens = new Uint16Array(maxRecords);
      let n = 0;
      for (let at = 0; at < size;) {
        if (at + RECORD_HEADER > size) throw new TlcError('E_CORRUPT', `${file}: truncated record at ${at}`);
        const page = data.readUInt32LE(at);
        const len = data.readUInt16LE(at + 4);
        if (len === 0 || len >= PAGE_SIZE || at + RECORD_HEADER + len > size) {
          throw new TlcError('E_CORRUPT', `${file}: bad record length at ${at}`);
        }
        if (page >= blockPages || (n > 0 && page <= (pages[n - 1] as number))) {
          throw new TlcError('E_CORRUPT', `${file}: page ${page} out of order or range at ${at}`);
        }
        pages[n] = page;
        offsets[n] = at + RECORD_HEADER;
        lens[n] = len;
        n++;
        at += RECORD_HEADER + len;
      }
      return new DeltaIndex(pages.subarray(0, n), offsets.subarray(0, n), lens.subarray(0, n), fd, file);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** Record number of `page`'s delta, or -1. */
  find(page: number): number {
    let lo = 0;
    let hi = this.pages.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const v = this.pages[mid] as number;
      if (v === page) return mid;
      if (v < page) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  /** Reads record `r` into `into`; returns its length. */
  read(r: number, into: Buffer): number {
    const len = this.lens[r] as number;
    readFull(this.fd, into, len, this.offsets[r] as number, this.file);
    return len;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
