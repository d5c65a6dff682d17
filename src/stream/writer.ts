/**
 * MigrationStreamWriter: synthesizes QEMU 7.2 precopy streams for restore (eager: every page;
 * lazy: the small blocks only, guest RAM mapped from the checkpoint image).
 *
 *   header(config) → ramStart(...) → { beginRamPart() | beginRamEnd() → page()/zeroPage()* →
 *   endRamSection() }* → deviceState(blob) → flush()
 *
 * Records are packed into output chunks of `chunkSize` bytes (1 MiB by default) that are handed to
 * `out` one at a time, in order; the next call waits until the previous promise settled. Every
 * write method returns `true` while at most `highWaterMark` bytes wait for `out`, and `false`
 * once more do: then `await writer.drain()` before writing more (the same contract as
 * stream.Writable#write). `flush()` emits the partial chunk and resolves when `out` has accepted
 * everything. A failure of `out` is rethrown by every later call. Writing a page copies it into the
 * current chunk and allocates nothing else.
 */
import { StreamError } from '../core/errors.js';
import { LAYOUT, QEMU } from './constants.js';
import { parseConfiguration } from './configuration.js';
import type { RamBlockInfo, RamSectionHeader } from './reader.js';

export type ChunkSink = (chunk: Buffer) => Promise<void> | void;

export interface WriterOptions {
  /** Size of the chunks handed to `out`. Default 1 MiB. */
  chunkSize?: number;
  /** Bytes waiting for `out` before the write methods return false. Default 4 × chunkSize. */
  highWaterMark?: number;
  /** Target page size; the configuration's target-page-bits, when present, must agree. Default 4096. */
  targetPageSize?: number;
}

const DEFAULT_CHUNK_SIZE = 1024 * 1024;
const TWO_32 = 0x1_0000_0000;
const { RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_EOS } = QEMU;

// Writer phases, in the only order QEMU accepts them.
const P_NEW = 0;
const P_HEADER = 1; // header written
const P_RAM = 2; // between RAM sections
const P_SECTION = 3; // inside a PART/END section
const P_DEVICE = 4; // device state written
const PHASE_NAMES = [
  'before header()',
  'after header()',
  'between RAM sections',
  'inside a RAM section',
  'after deviceState()',
];

interface Waiter {
  limit: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class MigrationStreamWriter {
  private readonly out: ChunkSink;
  private readonly chunkSize: number;
  private readonly highWaterMark: number;
  private tps: number;

  private buf: Buffer;
  private len = 0;
  private written = 0;

  private backlog: Buffer[] = [];
  /** Bytes emitted but not yet accepted by `out` (queued + in flight). */
  private pending = 0;
  private inflight = false;
  private failure: unknown = null;
  private waiters: Waiter[] = [];

  private phase = P_NEW;
  private ignoreShared = false;
  private sectionId = 0;
  private blockNames: Buffer[] = [];
  private blockLengths: number[] = [];
  private sawEnd = false;
  /** Block named by the last page record; `named` = some record of this section named a block. */
  private lastBlock = -1;
  private named = false;

  constructor(out: ChunkSink, opts: WriterOptions = {}) {
    this.out = out;
    this.chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    this.highWaterMark = opts.highWaterMark ?? 4 * this.chunkSize;
    this.tps = opts.targetPageSize ?? QEMU.TARGET_PAGE_SIZE_DEFAULT;
    if (this.chunkSize < 2 * this.tps + 512) throw new RangeError(`chunkSize ${this.chunkSize} is too small`);
    this.buf = Buffer.allocUnsafe(this.chunkSize);
  }

  /** Bytes of stream produced so far (including bytes still buffered). */
  get offset(): number {
    return this.written;
  }

  /** File header (QEVM, version 3) followed by the configuration section, verbatim. */
  header(configurationRaw: Buffer): boolean {
    this.expect(P_NEW, 'header()');
    const config = parseConfiguration(configurationRaw);
    if (config.targetPageBits !== undefined && 2 ** config.targetPageBits !== this.tps) {
      throw new StreamError(
        `configuration target page size ${2 ** config.targetPageBits} != writer's ${this.tps}`,
        0,
      );
    }
    this.ignoreShared = config.capabilities.includes(QEMU.MIGRATION_CAPABILITY_X_IGNORE_SHARED);
    this.reserve(LAYOUT.FILE_HEADER);
    this.u32(QEMU.QEMU_VM_FILE_MAGIC);
    this.u32(QEMU.QEMU_VM_FILE_VERSION);
    this.bytes(configurationRaw);
    this.phase = P_HEADER;
    return this.ok();
  }

  /**
   * RAM START section: MEM_SIZE with the block list (each entry with `mrAddr` when
   * `ignoreShared`, which must match the configuration's capabilities), EOS, footer.
   */
  ramStart(h: RamSectionHeader, blocks: readonly RamBlockInfo[], opts: { ignoreShared: boolean }): boolean {
    this.expect(P_HEADER, 'ramStart()');
    if (opts.ignoreShared !== this.ignoreShared) {
      throw new StreamError(
        `ramStart ignoreShared=${opts.ignoreShared} but the configuration section ${this.ignoreShared ? 'enables' : 'does not enable'} x-ignore-shared`,
        this.written,
      );
    }
    let total = 0;
    for (const b of blocks) {
      const name = Buffer.from(b.name, 'latin1');
      if (name.length === 0 || name.length > QEMU.CSTR_MAX)
        throw new StreamError(`bad RAM block name ${JSON.stringify(b.name)}`, this.written);
      if (b.usedLength % this.tps !== 0)
        throw new StreamError(`RAM block ${b.name}: length not page aligned`, this.written);
      if (opts.ignoreShared && b.mrAddr === undefined)
        throw new StreamError(`RAM block ${b.name} has no mrAddr`, this.written);
      this.blockNames.push(name);
      this.blockLengths.push(b.usedLength);
      total += b.usedLength;
    }
    this.sectionId = h.sectionId;
    const idstr = Buffer.from(QEMU.RAM_IDSTR, 'latin1');
    this.reserve(
      LAYOUT.SHORT_SECTION_HEADER + 1 + idstr.length + LAYOUT.FULL_SECTION_HEADER_TAIL + LAYOUT.RAM_WORD,
    );
    this.u8(QEMU.QEMU_VM_SECTION_START);
    this.u32(h.sectionId);
    this.cstr(idstr);
    this.u32(h.instanceId);
    this.u32(h.versionId);
    this.u64(total + QEMU.RAM_SAVE_FLAG_MEM_SIZE);
    for (const [i, b] of blocks.entries()) {
      this.reserve(1 + QEMU.CSTR_MAX + 2 * LAYOUT.RAM_WORD);
      this.cstr(this.blockNames[i] as Buffer);
      this.u64(b.usedLength);
      if (opts.ignoreShared) this.u64(b.mrAddr as number);
    }
    this.phase = P_RAM;
    this.endSection();
    return this.ok();
  }

  /** Open a RAM PART section. */
  beginRamPart(): boolean {
    return this.beginSection(QEMU.QEMU_VM_SECTION_PART);
  }

  /** Open the RAM END section (pages written into it are the last ones; at most one END). */
  beginRamEnd(): boolean {
    return this.beginSection(QEMU.QEMU_VM_SECTION_END);
  }

  /** Close the open PART/END section: EOS and footer. */
  endRamSection(): boolean {
    this.expect(P_SECTION, 'endRamSection()');
    this.endSection();
    return this.ok();
  }

  /** An END section holding only EOS. */
  ramEnd(): boolean {
    this.beginRamEnd();
    return this.endRamSection();
  }

  /** A PAGE record: `data` (one target page) is copied into the output. */
  page(block: number, offset: number, data: Buffer): boolean {
    if (data.length !== this.tps)
      throw new StreamError(`page of ${data.length} bytes (page size ${this.tps})`, this.written);
    return this.pageAt(block, offset, data, 0);
  }

  /** A PAGE record from `source` at `at` (one target page), without a view per page. */
  pageAt(block: number, offset: number, source: Buffer, at: number): boolean {
    if (at < 0 || at + this.tps > source.length) {
      throw new StreamError(
        `page source range ${at}+${this.tps} outside ${source.length} bytes`,
        this.written,
      );
    }
    this.record(block, offset, RAM_SAVE_FLAG_PAGE, this.tps);
    source.copy(this.buf, this.len, at, at + this.tps);
    this.len += this.tps;
    this.written += this.tps;
    return this.ok();
  }

  /** A ZERO record: the page filled with `fill` (QEMU only writes 0). */
  zeroPage(block: number, offset: number, fill = 0): boolean {
    this.record(block, offset, RAM_SAVE_FLAG_ZERO, 1);
    this.u8(fill);
    return this.ok();
  }

  /**
   * The device state blob as collected by the reader (FULL sections, EOF, VMDESC), verbatim.
   * Large blobs are handed to `out` as they are, not copied: do not modify until flush() resolves.
   */
  deviceState(blob: Buffer): boolean {
    this.expect(P_RAM, 'deviceState()');
    const first = blob[0];
    if (first !== QEMU.QEMU_VM_SECTION_FULL && first !== QEMU.QEMU_VM_EOF) {
      throw new StreamError('device state must start with a FULL section or EOF', this.written);
    }
    if (blob.length <= this.buf.length - this.len) {
      this.bytes(blob);
    } else {
      this.emitChunk();
      this.written += blob.length;
      this.emit(blob);
    }
    this.phase = P_DEVICE;
    return this.ok();
  }

  /** Resolves when at most `highWaterMark` bytes wait for `out` (rejects with its failure). */
  drain(): Promise<void> {
    return this.waitFor(this.highWaterMark);
  }

  /** Emit the partial chunk and resolve when `out` has accepted every byte. */
  flush(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    this.emitChunk();
    return this.waitFor(0);
  }

  // ---- records ------------------------------------------------------------------------------------

  private beginSection(type: number): boolean {
    this.expect(P_RAM, type === QEMU.QEMU_VM_SECTION_END ? 'beginRamEnd()' : 'beginRamPart()');
    if (this.sawEnd) throw new StreamError('RAM section after the END section', this.written);
    if (type === QEMU.QEMU_VM_SECTION_END) this.sawEnd = true;
    this.reserve(LAYOUT.SHORT_SECTION_HEADER);
    this.u8(type);
    this.u32(this.sectionId);
    this.named = false;
    this.phase = P_SECTION;
    return this.ok();
  }

  private endSection(): void {
    this.reserve(LAYOUT.RAM_WORD + LAYOUT.SECTION_FOOTER);
    this.u64(RAM_SAVE_FLAG_EOS);
    this.u8(QEMU.QEMU_VM_SECTION_FOOTER);
    this.u32(this.sectionId);
    this.phase = P_RAM;
  }

  /** Header word and, on the section's first record or a block change, the block name. */
  private record(block: number, offset: number, flag: number, payload: number): void {
    if (this.phase !== P_SECTION) this.expect(P_SECTION, 'page()/zeroPage()');
    const name = this.blockNames[block];
    const length = this.blockLengths[block];
    if (name === undefined || length === undefined)
      throw new StreamError(`no RAM block #${block}`, this.written);
    if (offset % this.tps !== 0 || offset < 0 || offset + this.tps > length) {
      throw new StreamError(
        `page offset ${offset} invalid for RAM block ${name.toString('latin1')}`,
        this.written,
      );
    }
    const cont = this.named && block === this.lastBlock;
    this.reserve(LAYOUT.RAM_WORD + 1 + name.length + payload);
    this.u64(offset + flag + (cont ? RAM_SAVE_FLAG_CONTINUE : 0));
    if (!cont) {
      this.cstr(name);
      this.lastBlock = block;
      this.named = true;
    }
  }

  private expect(phase: number, what: string): void {
    if (this.failure !== null) throw this.failure;
    if (this.phase !== phase) {
      throw new StreamError(`${what} called ${PHASE_NAMES[this.phase] ?? ''}`, this.written);
    }
  }

  // ---- chunk building -------------------------------------------------------------------------------

  private reserve(n: number): void {
    if (this.len + n > this.buf.length) this.emitChunk();
  }

  private u8(v: number): void {
    this.buf[this.len++] = v;
    this.written += 1;
  }

  private u32(v: number): void {
    this.buf.writeUInt32BE(v, this.len);
    this.len += 4;
    this.written += 4;
  }

  private u64(v: number): void {
    const hi = Math.floor(v / TWO_32);
    this.buf.writeUInt32BE(hi, this.len);
    this.buf.writeUInt32BE(v - hi * TWO_32, this.len + 4);
    this.len += 8;
    this.written += 8;
  }

  private cstr(name: Buffer): void {
    this.buf[this.len++] = name.length;
    name.copy(this.buf, this.len);
    this.len += name.length;
    this.written += 1 + name.length;
  }

  /** Bytes of any length: through the chunk, split across chunks if needed. */
  private bytes(b: Buffer): void {
    let done = 0;
    while (done < b.length) {
      if (this.len === this.buf.length) this.emitChunk();
      const n = b.copy(this.buf, this.len, done);
      this.len += n;
      done += n;
    }
    this.written += b.length;
  }

  private emitChunk(): void {
    if (this.len === 0) return;
    const chunk = this.buf.subarray(0, this.len);
    this.buf = Buffer.allocUnsafe(this.chunkSize);
    this.len = 0;
    this.emit(chunk);
  }

  // ---- output pump ----------------------------------------------------------------------------------

  private ok(): boolean {
    if (this.failure !== null) throw this.failure;
    return this.pending <= this.highWaterMark;
  }

  private emit(chunk: Buffer): void {
    this.backlog.push(chunk);
    this.pending += chunk.length;
    this.pump();
  }

  private pump(): void {
    while (!this.inflight && this.failure === null) {
      const chunk = this.backlog.shift();
      if (chunk === undefined) break;
      let r: Promise<void> | void;
      try {
        r = this.out(chunk);
      } catch (err) {
        this.fail(err);
        return;
      }
      if (r instanceof Promise) {
        this.inflight = true;
        r.then(
          () => {
            this.inflight = false;
            this.pending -= chunk.length;
            this.pump();
          },
          (err: unknown) => this.fail(err),
        );
        return;
      }
      this.pending -= chunk.length;
    }
    this.notify();
  }

  private fail(err: unknown): void {
    this.failure ??= err;
    this.inflight = false;
    this.notify();
  }

  private waitFor(limit: number): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.pending <= limit) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ limit, resolve, reject }));
  }

  private notify(): void {
    if (this.waiters.length === 0) return;
    const keep: Waiter[] = [];
    for (const w of this.waiters) {
      if (this.failure !== null) w.reject(this.failure);
      else if (this.pending <= w.limit) w.resolve();
      else keep.push(w);
    }
    this.waiters = keep;
  }
}
