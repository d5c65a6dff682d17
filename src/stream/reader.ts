/**
 * Incremental reader for QEMU 7.2 precopy migration streams (wire reference:
 * /work/shared/reference/qemu-migration-stream.md).
 *
 *   be32 magic "QEVM" | be32 version 3 | configuration (0x07 ...) |
 *   { COMMAND | RAM START | RAM PART | RAM END }* | device area: FULL × n, EOF, [VMDESC]
 *
 * `push()` feeds chunks of any size; every complete record is handed to the sink at once, pages as
 * views into the pushed chunk (copied only when a record spans two chunks). The RAM page path
 * allocates nothing of its own: the only per-page object is the `subarray` view handed to the sink.
 * The device area (everything from the first FULL section to the end) is opaque without QEMU's field
 * tables: it is collected verbatim and validated against the stream's own VM description when
 * `end()` is called. Every parse failure is a StreamError carrying the stream offset; after one the
 * reader stays failed.
 */
import { inflateSync } from 'node:zlib';
import { StreamError } from '../core/errors.js';
import { LAYOUT, QEMU, compressBound } from './constants.js';
import { decodeConfiguration, peekString, type ConfigurationInfo } from './configuration.js';
import { ByteQueue } from './queue.js';
import { verifyDeviceState, type DeviceStateInfo } from './vmdesc.js';

export type { DeviceStateInfo } from './vmdesc.js';
export { parseConfiguration, type ConfigurationInfo } from './configuration.js';
export { applyXbzrle } from './xbzrle.js';

export interface RamBlockInfo {
  /** RAM block idstr, e.g. `ram0`, `pc.bios`, `/rom@etc/acpi/tables`. */
  name: string;
  /** Bytes of the block that are migrated (a multiple of the target page size). */
  usedLength: number;
  /** The block's memory-region address; present iff `x-ignore-shared` is on. */
  mrAddr?: number;
  /** The block's page size; present only with postcopy-ram for blocks whose page size is not the host's. */
  pageSize?: number;
}

export interface RamSectionHeader {
  sectionId: number;
  instanceId: number;
  versionId: number;
}

export type RamSectionKind = 'start' | 'part' | 'end';

export interface StreamSink {
  /** `raw` = the exact bytes of the configuration section (0x07 ... incl. subsections), copied. */
  onConfiguration(machineType: string, raw: Buffer): void;
  onRamStart(header: RamSectionHeader): void;
  /** From the MEM_SIZE record; `block` arguments below index this list. */
  onBlockList(blocks: readonly RamBlockInfo[]): void;
  /** `page` is a view valid only during the call. */
  onPage(block: number, offset: number, page: Buffer): void;
  onZeroPage(block: number, offset: number, fill: number): void;
  /** Apply with applyXbzrle() to the page's current contents; `delta` is valid only during the call. */
  onXbzrlePage(block: number, offset: number, delta: Buffer): void;
  /** After each RAM section's EOS and footer; `bytesInSection` counts header to footer inclusive. */
  onRamSectionEnd(kind: RamSectionKind, bytesInSection: number): void;
  /** Everything from the first FULL section to the end of the stream, validated; called by end(). */
  onDeviceState(blob: Buffer, info: DeviceStateInfo): void;
  onCommand?(command: number, payload: Buffer): void;
}

export interface ReaderOptions {
  /** Upper bound for the MEM_SIZE total (sum of all block lengths). Default 1 TiB. */
  maxRamBytes?: number;
  /** Upper bound for the device area (FULL sections + EOF + VMDESC). Default 64 MiB. */
  maxDeviceStateBytes?: number;
  /** Reject streams without a VM description instead of accepting them unverified. Default false. */
  requireVmdesc?: boolean;
}

export const DEFAULT_MAX_RAM_BYTES = 2 ** 40;
export const DEFAULT_MAX_DEVICE_STATE_BYTES = 64 * 1024 * 1024;
/** More RAM blocks than any real machine has; bounds the MEM_SIZE list. */
const MAX_RAM_BLOCKS = 4096;
/** be64 values are split into be32 halves; a high half above this would pass 2^53. */
const MAX_SAFE_HI = 0x1fffff;
const TWO_32 = 0x1_0000_0000;
const DEVICE_BUFFER_INITIAL = 256 * 1024;

const {
  QEMU_VM_EOF,
  QEMU_VM_SECTION_START,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SUBSECTION,
  QEMU_VM_COMMAND,
  RAM_SAVE_FLAG_FULL,
  RAM_SAVE_FLAG_ZERO,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_XBZRLE,
  RAM_SAVE_FLAG_HOOK,
  RAM_SAVE_FLAG_COMPRESS_PAGE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
} = QEMU;

// Reader states.
const S_HEADER = 0;
const S_CONFIG = 1;
const S_TOP = 2;
const S_RAM = 3;
const S_MEM_SIZE = 4;
const S_FOOTER = 5;
const S_DEVICE = 6;
const S_DONE = 7;

const STATE_WHERE = [
  'in the file header',
  'in the configuration section',
  'between sections (no device state)',
  'inside a RAM section',
  'inside the RAM block list',
  'before a RAM section footer',
  'in the device state',
  'after the end',
];

const COMMAND_NAMES: Record<number, string> = {
  [QEMU.MIG_CMD_OPEN_RETURN_PATH]: 'OPEN_RETURN_PATH',
  [QEMU.MIG_CMD_PING]: 'PING',
  [QEMU.MIG_CMD_POSTCOPY_ADVISE]: 'POSTCOPY_ADVISE',
  [QEMU.MIG_CMD_POSTCOPY_LISTEN]: 'POSTCOPY_LISTEN',
  [QEMU.MIG_CMD_POSTCOPY_RUN]: 'POSTCOPY_RUN',
  [QEMU.MIG_CMD_POSTCOPY_RAM_DISCARD]: 'POSTCOPY_RAM_DISCARD',
  [QEMU.MIG_CMD_PACKAGED]: 'PACKAGED',
  [QEMU.MIG_CMD_ENABLE_COLO]: 'ENABLE_COLO',
  [QEMU.MIG_CMD_POSTCOPY_RESUME]: 'POSTCOPY_RESUME',
  [QEMU.MIG_CMD_RECV_BITMAP]: 'RECV_BITMAP',
};

function hex(v: number): string {
  return '0x' + v.toString(16);
}

export class MigrationStreamReader {
  private readonly sink: StreamSink;
  private readonly maxRamBytes: number;
  private readonly maxDeviceStateBytes: number;
  private readonly requireVmdesc: boolean;
  private readonly q = new ByteQueue();
  /** Stream offset of the queue head (bytes consumed). */
  private pos = 0;
  private state = S_HEADER;
  private failure: unknown = null;
  private ended = false;
  private isComplete = false;

  private config: ConfigurationInfo | null = null;
  private tps: number = QEMU.TARGET_PAGE_SIZE_DEFAULT;
  private flagMask: number = QEMU.TARGET_PAGE_SIZE_DEFAULT - 1;
  private ignoreShared = false;
  private postcopyRam = false;

  private ramSectionId = -1;
  private sawRamEnd = false;
  private sectionKind: RamSectionKind = 'start';
  private sectionStart = 0;

  private blocks: RamBlockInfo[] = [];
  private blockNames: Buffer[] = [];
  private blockLengths: number[] = [];
  private haveBlockList = false;
  private memRemaining = 0;
  /** The block most recently named on this channel (CONTINUE refers to it, across sections). */
  private curBlock = -1;

  private devBuf: Buffer = Buffer.alloc(0);
  private devLen = 0;
  private devStart = 0;

  constructor(sink: StreamSink, opts: ReaderOptions = {}) {
    this.sink = sink;
    this.maxRamBytes = opts.maxRamBytes ?? DEFAULT_MAX_RAM_BYTES;
    this.maxDeviceStateBytes = opts.maxDeviceStateBytes ?? DEFAULT_MAX_DEVICE_STATE_BYTES;
    this.requireVmdesc = opts.requireVmdesc ?? false;
  }

  /** Bytes consumed so far. */
  get offset(): number {
    return this.pos;
  }

  /** True once end() has validated a complete stream. */
  get complete(): boolean {
    return this.isComplete;
  }

  /** The decoded configuration section, once read. */
  get configuration(): ConfigurationInfo | null {
    return this.config;
  }

  /** The RAM block list, once the MEM_SIZE record has been read. */
  get blockList(): readonly RamBlockInfo[] {
    return this.blocks;
  }

  /** Target page size in effect (4096 unless the configuration announced target-page-bits). */
  get targetPageSize(): number {
    return this.tps;
  }

  /** Feed the next chunk. Throws StreamError on malformed input (and on every call after that). */
  push(chunk: Buffer): void {
    if (this.failure !== null) throw this.failure;
    if (this.ended) throw new StreamError('push() after end()', this.pos);
    this.q.push(chunk);
    try {
      this.run();
    } catch (err) {
      this.failure = err;
      throw err;
    }
  }

  /** The input has ended: validate the device state and deliver it. Throws unless complete. */
  end(): void {
    if (this.failure !== null) throw this.failure;
    if (this.ended) return;
    this.ended = true;
    try {
      if (this.state !== S_DEVICE) {
        const partial = this.q.length > 0 ? `, with ${this.q.length} bytes of an incomplete record` : '';
        throw new StreamError(
          `truncated stream: it ends ${STATE_WHERE[this.state] ?? ''}${partial}`,
          this.pos + this.q.length,
        );
      }
      const blob = this.devBuf.subarray(0, this.devLen);
      const info = verifyDeviceState(blob, this.devStart, this.requireVmdesc);
      this.state = S_DONE;
      this.sink.onDeviceState(blob, info);
      this.isComplete = true;
    } catch (err) {
      this.failure = err;
      throw err;
    }
  }

  private run(): void {
    for (;;) {
      let progressed: boolean;
      switch (this.state) {
        case S_HEADER:
          progressed = this.parseFileHeader();
          break;
        case S_CONFIG:
          progressed = this.parseConfiguration();
          break;
        case S_TOP:
          progressed = this.parseTopLevel();
          break;
        case S_RAM:
          progressed = this.parseRamRecord();
          break;
        case S_MEM_SIZE:
          progressed = this.parseBlockEntry();
          break;
        case S_FOOTER:
          progressed = this.parseFooter();
          break;
        case S_DEVICE:
          this.collectDeviceState();
          return;
        default:
          return;
      }
      if (!progressed) return;
    }
  }

  private consume(n: number): void {
    this.q.skip(n);
    this.pos += n;
  }

  private parseFileHeader(): boolean {
    const q = this.q;
    if (q.length < LAYOUT.FILE_HEADER) return false;
    const magic = q.u32(0);
    if (magic !== QEMU.QEMU_VM_FILE_MAGIC) {
      throw new StreamError(
        `bad magic ${hex(magic)} (expected QEVM ${hex(QEMU.QEMU_VM_FILE_MAGIC)})`,
        this.pos,
      );
    }
    const version = q.u32(4);
    if (version === QEMU.QEMU_VM_FILE_VERSION_COMPAT) {
      throw new StreamError('stream version 2 is obsolete (QEMU writes version 3)', this.pos + 4);
    }
    if (version !== QEMU.QEMU_VM_FILE_VERSION) {
      throw new StreamError(`unsupported stream version ${version} (expected 3)`, this.pos + 4);
    }
    this.consume(LAYOUT.FILE_HEADER);
    this.state = S_CONFIG;
    return true;
  }

  private parseConfiguration(): boolean {
    const r = decodeConfiguration(this.q, false, this.pos);
    if (r === null) return false;
    const raw = Buffer.from(this.q.take(r.length));
    this.pos += r.length;
    this.config = r.info;
    if (r.info.targetPageBits !== undefined) {
      this.tps = 2 ** r.info.targetPageBits;
      this.flagMask = this.tps - 1;
    }
    this.ignoreShared = r.info.capabilities.includes(QEMU.MIGRATION_CAPABILITY_X_IGNORE_SHARED);
    this.state = S_TOP;
    this.sink.onConfiguration(r.info.machineType, raw);
    return true;
  }

  private parseTopLevel(): boolean {
    const q = this.q;
    if (q.length < 1) return false;
    const type = q.u8(0);
    switch (type) {
      case QEMU_VM_SECTION_START:
        return this.parseStartHeader();
      case QEMU_VM_SECTION_PART:
      case QEMU_VM_SECTION_END:
        return this.parseShortHeader(type);
      case QEMU_VM_COMMAND:
        return this.parseCommand();
      case QEMU_VM_SECTION_FULL:
      case QEMU_VM_EOF:
        if (this.ramSectionId < 0) throw new StreamError('device state before any RAM section', this.pos);
        this.devStart = this.pos;
        this.state = S_DEVICE;
        return true;
      case QEMU_VM_SUBSECTION:
      case QEMU.QEMU_VM_VMDESCRIPTION:
      case QEMU.QEMU_VM_CONFIGURATION:
      case QEMU_VM_SECTION_FOOTER:
        throw new StreamError(`record type ${hex(type)} is not allowed at top level here`, this.pos);
      default:
        throw new StreamError(`unknown section type ${hex(type)}`, this.pos);
    }
  }

  private parseStartHeader(): boolean {
    const q = this.q;
    const nameAt = LAYOUT.SHORT_SECTION_HEADER;
    if (q.length < nameAt + 1) return false;
    const n = q.u8(nameAt);
    const tail = nameAt + 1 + n;
    if (q.length < tail + LAYOUT.FULL_SECTION_HEADER_TAIL) return false;
    const idstr = peekString(q, nameAt + 1, n);
    if (idstr !== QEMU.RAM_IDSTR) {
      throw new StreamError(
        `iterable section ${JSON.stringify(idstr)} is not supported (only RAM; block migration and dirty bitmaps are not)`,
        this.pos,
      );
    }
    if (this.ramSectionId >= 0) throw new StreamError('a second RAM START section', this.pos);
    const header: RamSectionHeader = {
      sectionId: q.u32(1),
      instanceId: q.u32(tail),
      versionId: q.u32(tail + 4),
    };
    if (header.versionId !== QEMU.RAM_VERSION_ID) {
      throw new StreamError(
        `RAM section version ${header.versionId} (expected ${QEMU.RAM_VERSION_ID})`,
        this.pos + tail + 4,
      );
    }
    this.sectionStart = this.pos;
    this.sectionKind = 'start';
    this.ramSectionId = header.sectionId;
    this.consume(tail + LAYOUT.FULL_SECTION_HEADER_TAIL);
    this.state = S_RAM;
    this.sink.onRamStart(header);
    return true;
  }

  private parseShortHeader(type: number): boolean {
    const q = this.q;
    if (q.length < LAYOUT.SHORT_SECTION_HEADER) return false;
    const id = q.u32(1);
    const kind = type === QEMU_VM_SECTION_PART ? 'PART' : 'END';
    if (this.ramSectionId < 0) throw new StreamError(`section ${kind} (id ${id}) before any START`, this.pos);
    if (id !== this.ramSectionId) {
      throw new StreamError(
        `section ${kind} for id ${id}, but the RAM section is id ${this.ramSectionId}`,
        this.pos,
      );
    }
    if (!this.haveBlockList) throw new StreamError(`RAM ${kind} section before the block list`, this.pos);
    if (this.sawRamEnd) throw new StreamError(`RAM ${kind} section after the RAM END section`, this.pos);
    this.sectionStart = this.pos;
    this.sectionKind = type === QEMU_VM_SECTION_PART ? 'part' : 'end';
    if (type === QEMU_VM_SECTION_END) this.sawRamEnd = true;
    this.consume(LAYOUT.SHORT_SECTION_HEADER);
    this.state = S_RAM;
    return true;
  }

  private parseCommand(): boolean {
    const q = this.q;
    if (q.length < LAYOUT.COMMAND_HEADER) return false;
    const cmd = q.u16(1);
    const len = q.u16(3);
    const name = COMMAND_NAMES[cmd];
    const at = this.pos;
    switch (cmd) {
      case QEMU.MIG_CMD_OPEN_RETURN_PATH:
        if (len !== 0) throw new StreamError(`OPEN_RETURN_PATH with length ${len}`, at);
        break;
      case QEMU.MIG_CMD_PING:
        if (len !== 4) throw new StreamError(`PING with length ${len}`, at);
        break;
      case QEMU.MIG_CMD_POSTCOPY_ADVISE:
        if (len !== 0 && len !== 16) throw new StreamError(`POSTCOPY_ADVISE with length ${len}`, at);
        break;
      case QEMU.MIG_CMD_POSTCOPY_LISTEN:
      case QEMU.MIG_CMD_POSTCOPY_RUN:
      case QEMU.MIG_CMD_POSTCOPY_RAM_DISCARD:
      case QEMU.MIG_CMD_PACKAGED:
      case QEMU.MIG_CMD_POSTCOPY_RESUME:
      case QEMU.MIG_CMD_RECV_BITMAP:
        throw new StreamError(`postcopy streams are not supported (command ${name ?? cmd})`, at);
      case QEMU.MIG_CMD_ENABLE_COLO:
        throw new StreamError('COLO streams are not supported (command ENABLE_COLO)', at);
      default:
        throw new StreamError(`invalid command ${cmd}`, at);
    }
    if (q.length < LAYOUT.COMMAND_HEADER + len) return false;
    this.consume(LAYOUT.COMMAND_HEADER);
    const payload = q.take(len);
    this.pos += len;
    if (cmd === QEMU.MIG_CMD_POSTCOPY_ADVISE && len === 16) {
      // be64 host page-size summary, be64 target page size. Turns on the MEM_SIZE page_size extra.
      if (payload.readUInt32BE(8) !== 0 || payload.readUInt32BE(12) !== this.tps) {
        throw new StreamError(
          'POSTCOPY_ADVISE announces a different target page size',
          at + LAYOUT.COMMAND_HEADER + 8,
        );
      }
      this.postcopyRam = true;
    }
    this.sink.onCommand?.(cmd, payload);
    return true;
  }

  private parseFooter(): boolean {
    const q = this.q;
    if (q.length < LAYOUT.SECTION_FOOTER) return false;
    if (q.u8(0) !== QEMU_VM_SECTION_FOOTER) {
      throw new StreamError(`expected a section footer (0x7e), found ${hex(q.u8(0))}`, this.pos);
    }
    const id = q.u32(1);
    if (id !== this.ramSectionId) {
      throw new StreamError(
        `section footer for id ${id} closes RAM section id ${this.ramSectionId}`,
        this.pos,
      );
    }
    this.consume(LAYOUT.SECTION_FOOTER);
    this.state = S_TOP;
    this.sink.onRamSectionEnd(this.sectionKind, this.pos - this.sectionStart);
    return true;
  }

  /** One RAM record; the hot path. */
  private parseRamRecord(): boolean {
    const q = this.q;
    if (q.length < LAYOUT.RAM_WORD) return false;
    const hi = q.u32(0);
    const lo = q.u32(4);
    const flags = lo & this.flagMask;
    switch (flags & ~RAM_SAVE_FLAG_CONTINUE) {
      case RAM_SAVE_FLAG_PAGE:
      case RAM_SAVE_FLAG_ZERO:
      case RAM_SAVE_FLAG_XBZRLE:
      case RAM_SAVE_FLAG_COMPRESS_PAGE:
        return this.parsePageRecord(hi, lo, flags);
      case RAM_SAVE_FLAG_EOS:
        if (hi !== 0 || lo !== RAM_SAVE_FLAG_EOS) {
          throw new StreamError(`malformed EOS record word ${hex(hi)}:${hex(lo)}`, this.pos);
        }
        this.consume(LAYOUT.RAM_WORD);
        this.state = S_FOOTER;
        return true;
      case RAM_SAVE_FLAG_MEM_SIZE:
        return this.parseMemSize(hi, lo, flags);
      case RAM_SAVE_FLAG_HOOK:
        throw new StreamError('RAM_SAVE_FLAG_HOOK: RDMA streams are not supported', this.pos);
      case RAM_SAVE_FLAG_FULL:
        throw new StreamError('RAM_SAVE_FLAG_FULL (0x01) is retired and never valid', this.pos);
      case RAM_SAVE_FLAG_MULTIFD_FLUSH:
        throw new StreamError(
          'RAM_SAVE_FLAG_MULTIFD_FLUSH (0x200) comes from QEMU 8.0 or newer; only 7.2 streams are supported',
          this.pos,
        );
      default:
        throw new StreamError(`unknown RAM record flags ${hex(flags)}`, this.pos);
    }
  }

  private parseMemSize(hi: number, lo: number, flags: number): boolean {
    const at = this.pos;
    if (flags !== RAM_SAVE_FLAG_MEM_SIZE)
      throw new StreamError(`MEM_SIZE with extra flags ${hex(flags)}`, at);
    if (this.sectionKind !== 'start' || this.haveBlockList) {
      throw new StreamError('MEM_SIZE outside the first RAM START section', at);
    }
    if (hi > MAX_SAFE_HI) throw new StreamError('MEM_SIZE total beyond 2^53', at);
    const total = hi * TWO_32 + (lo - flags);
    if (total > this.maxRamBytes) {
      throw new StreamError(`MEM_SIZE total ${total} exceeds the limit of ${this.maxRamBytes} bytes`, at);
    }
    this.consume(LAYOUT.RAM_WORD);
    this.memRemaining = total;
    this.state = S_MEM_SIZE;
    if (total === 0) this.finishBlockList();
    return true;
  }

  /** One MEM_SIZE entry: cstr idstr, be64 used_length, [be64 page_size], [be64 mr_addr]. */
  private parseBlockEntry(): boolean {
    const q = this.q;
    const at = this.pos;
    if (q.length < 1) return false;
    const n = q.u8(0);
    if (n === 0) throw new StreamError('RAM block with an empty name', at);
    let p = 1 + n;
    if (q.length < p + 8) return false;
    const usedHi = q.u32(p);
    const used = usedHi * TWO_32 + q.u32(p + 4);
    p += 8;
    if (usedHi > MAX_SAFE_HI || used > this.memRemaining) {
      throw new StreamError(`RAM block list disagrees with the MEM_SIZE total (block of ${used} bytes)`, at);
    }
    let pageSize: number | undefined;
    if (this.postcopyRam) {
      // Present only for blocks whose page size differs from the host's, which the stream does not
      // say. It is recognisable: a page size is a power of two above TPS, so it cannot be the next
      // block's cstr (first byte = non-zero length) nor the next record word (non-zero flag bits).
      if (q.length < p + 8) return false;
      const h = q.u32(p);
      const v = h * TWO_32 + q.u32(p + 4);
      if (h <= MAX_SAFE_HI && v > this.tps && Math.log2(v) % 1 === 0) {
        pageSize = v;
        p += 8;
      }
    }
    let mrAddr: number | undefined;
    if (this.ignoreShared) {
      if (q.length < p + 8) return false;
      const h = q.u32(p);
      if (h > MAX_SAFE_HI) throw new StreamError('RAM block mr_addr beyond 2^53', at + p);
      mrAddr = h * TWO_32 + q.u32(p + 4);
      p += 8;
    }
    if (this.blocks.length >= MAX_RAM_BLOCKS)
      throw new StreamError(`more than ${MAX_RAM_BLOCKS} RAM blocks`, at);
    const nameBytes = Buffer.alloc(n);
    for (let k = 0; k < n; k++) nameBytes[k] = q.u8(1 + k);
    const name = nameBytes.toString('latin1');
    if (this.blockNames.some((b) => b.equals(nameBytes))) {
      throw new StreamError(`RAM block ${JSON.stringify(name)} listed twice`, at);
    }
    const block: RamBlockInfo = { name, usedLength: used };
    if (mrAddr !== undefined) block.mrAddr = mrAddr;
    if (pageSize !== undefined) block.pageSize = pageSize;
    this.blocks.push(block);
    this.blockNames.push(nameBytes);
    this.blockLengths.push(used);
    this.consume(p);
    this.memRemaining -= used;
    if (this.memRemaining === 0) this.finishBlockList();
    return true;
  }

  private finishBlockList(): void {
    this.haveBlockList = true;
    this.state = S_RAM;
    this.sink.onBlockList(this.blocks);
  }

  /** ZERO, PAGE, XBZRLE or COMPRESS_PAGE: header word [+ cstr block] + payload. */
  private parsePageRecord(hi: number, lo: number, flags: number): boolean {
    const q = this.q;
    const at = this.pos;
    const tps = this.tps;
    if (!this.haveBlockList) throw new StreamError('page record before the RAM block list', at);
    if (hi > MAX_SAFE_HI) throw new StreamError('page offset beyond 2^53', at);
    const kind = flags & ~RAM_SAVE_FLAG_CONTINUE;
    let p: number = LAYOUT.RAM_WORD;
    let nameLen = -1;
    if ((flags & RAM_SAVE_FLAG_CONTINUE) === 0) {
      if (q.length < p + 1) return false;
      nameLen = q.u8(p);
      p += 1 + nameLen;
    } else if (this.curBlock < 0) {
      throw new StreamError('RAM record with CONTINUE but no block named before it', at);
    }
    let payload: number; // payload length after the kind-specific header
    let header = 0; // kind-specific header length
    switch (kind) {
      case RAM_SAVE_FLAG_ZERO:
        payload = 1;
        break;
      case RAM_SAVE_FLAG_PAGE:
        payload = tps;
        break;
      case RAM_SAVE_FLAG_XBZRLE: {
        header = LAYOUT.XBZRLE_HEADER;
        if (q.length < p + header) return false;
        const encoding = q.u8(p);
        if (encoding !== QEMU.ENCODING_FLAG_XBZRLE) {
          throw new StreamError(`XBZRLE record with encoding ${hex(encoding)}`, at + p);
        }
        payload = q.u16(p + 1);
        if (payload > tps) {
          // 0 is never sent (an unchanged page is skipped) but a 7.2 destination accepts it.
          throw new StreamError(`XBZRLE length ${payload} exceeds the page size ${tps}`, at + p + 1);
        }
        break;
      }
      default: {
        header = LAYOUT.COMPRESS_HEADER;
        if (q.length < p + header) return false;
        payload = q.u32(p);
        if (payload === 0 || payload > compressBound(tps)) {
          throw new StreamError(
            `COMPRESS_PAGE length ${payload} out of range 1..${compressBound(tps)}`,
            at + p,
          );
        }
      }
    }
    if (q.length < p + header + payload) return false;

    let block = this.curBlock;
    if (nameLen >= 0) {
      block = this.lookupBlock(nameLen);
      if (block < 0) {
        throw new StreamError(
          `unknown RAM block ${JSON.stringify(peekString(q, LAYOUT.RAM_WORD + 1, nameLen))}`,
          at,
        );
      }
      this.curBlock = block;
    }
    const offset = hi * TWO_32 + (lo - flags);
    if (offset + tps > (this.blockLengths[block] as number)) {
      throw new StreamError(
        `page at offset ${hex(offset)} lies beyond RAM block ${JSON.stringify(this.blocks[block]?.name)} ` +
          `(${this.blockLengths[block]} bytes)`,
        at,
      );
    }
    this.consume(p + header);
    const data = q.take(payload);
    this.pos += payload;
    switch (kind) {
      case RAM_SAVE_FLAG_ZERO:
        this.sink.onZeroPage(block, offset, data[0] as number);
        break;
      case RAM_SAVE_FLAG_PAGE:
        this.sink.onPage(block, offset, data);
        break;
      case RAM_SAVE_FLAG_XBZRLE:
        this.sink.onXbzrlePage(block, offset, data);
        break;
      default:
        this.sink.onPage(block, offset, this.inflatePage(data, at));
    }
    return true;
  }

  /** The block whose name is the `nameLen` bytes after the record word, or -1. */
  private lookupBlock(nameLen: number): number {
    const names = this.blockNames;
    const cur = names[this.curBlock];
    if (cur !== undefined && cur.length === nameLen && this.q.equals(LAYOUT.RAM_WORD + 1, cur))
      return this.curBlock;
    for (let i = 0; i < names.length; i++) {
      const b = names[i] as Buffer;
      if (b.length === nameLen && this.q.equals(LAYOUT.RAM_WORD + 1, b)) return i;
    }
    return -1;
  }

  /** COMPRESS_PAGE (rare: the `compress` capability): one complete zlib stream of exactly one page. */
  private inflatePage(data: Buffer, at: number): Buffer {
    let page: Buffer;
    try {
      page = inflateSync(data, { maxOutputLength: this.tps });
    } catch (err) {
      throw new StreamError('COMPRESS_PAGE does not inflate to one page', at, { cause: err });
    }
    if (page.length !== this.tps) {
      throw new StreamError(`COMPRESS_PAGE inflates to ${page.length} bytes, not ${this.tps}`, at);
    }
    return page;
  }

  /** Device area: keep every byte verbatim until end(). */
  private collectDeviceState(): void {
    const n = this.q.length;
    if (n === 0) return;
    const need = this.devLen + n;
    if (need > this.maxDeviceStateBytes) {
      throw new StreamError(
        `device state exceeds the limit of ${this.maxDeviceStateBytes} bytes`,
        this.devStart + this.maxDeviceStateBytes,
      );
    }
    if (need > this.devBuf.length) {
      let size = Math.max(this.devBuf.length * 2, DEVICE_BUFFER_INITIAL);
      while (size < need) size *= 2;
      const grown = Buffer.allocUnsafe(Math.min(size, this.maxDeviceStateBytes));
      this.devBuf.copy(grown, 0, 0, this.devLen);
      this.devBuf = grown;
    }
    this.q.copyOut(this.devBuf, this.devLen, n);
    this.devLen += n;
    this.pos += n;
  }
}
