/**
 * Wire format of the memory-server protocol: every message is one frame.
 *
 * Frame header (16 bytes, big-endian), then `length` payload bytes:
 *
 * | offset | size | field                                                      |
 * |--------|------|------------------------------------------------------------|
 * | 0      | 4    | magic `TLMS` (0x544c4d53)                                  |
 * | 4      | 2    | protocol version (PROTOCOL_VERSION)                        |
 * | 6      | 1    | frame type (FRAME)                                         |
 * | 7      | 1    | flags: none defined yet, must be 0                          |
 * | 8      | 4    | request id: a response carries its request's id; 0 = connection |
 * | 12     | 4    | payload length, checked against the type's limit before buffering |
 *
 * The first 8 bytes keep this layout in every future version, and HELLO (type 1, payload at most
 * MAX_HELLO_BYTES) and ERROR (type 5, JSON) keep theirs, so a peer can always read the version and
 * an ERROR frame from a peer that speaks another version, and say so clearly.
 *
 * Extent record (payload of PUT_EXTENT and EXTENT):
 *
 * | size | field                                    |
 * |------|------------------------------------------|
 * | 1    | checkpoint id length n                   |
 * | n    | checkpoint id (ASCII)                    |
 * | 2    | block name length m                      |
 * | m    | block name (UTF-8, a QEMU RAM block id)  |
 * | 4    | extent index within the block            |
 * | 8    | byte offset of the extent in the block   |
 * | 32   | SHA-256 of the data                      |
 * | rest | data (at most MAX_EXTENT_BYTES)          |
 *
 * Pages record (PUT_PAGES: pre-copy re-sends of the pages of an extent the server already has):
 * id length (1), id, block name length (2), block name, extent index (4), run count r (2), r runs
 * of (offset within the extent (4), length (4)), SHA-256 of the runs' data concatenated (32), the
 * runs' data concatenated. The server patches its copy and recomputes the stored checksum.
 *
 * Blob record (PUT_BLOB and BLOB): id length (1), id, name length (1), name, SHA-256 (32), data.
 * Control frames (requests other than puts, OK and ERROR answers) carry JSON: they are rare and
 * small, extents never go through JSON.
 */
import { ProtocolError } from './errors.js';

export const MAGIC = 0x544c4d53;
export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 16;

const H = { magic: 0, version: 4, type: 6, flags: 7, requestId: 8, length: 12 } as const;

export const FRAME = {
  /** client → server: 32-byte client nonce; the header's version is the client's. */
  HELLO: 1,
  /** server → client: 32-byte server nonce. */
  CHALLENGE: 2,
  /** client → server: the client's proof (auth.ts). */
  AUTH: 3,
  /** server → client: the server's proof; requests may follow. */
  WELCOME: 4,
  /** either way: JSON {code, message}; request id 0 = about the connection, which then closes. */
  ERROR: 5,
  /** server → client: JSON result of a request. */
  OK: 6,
  BEGIN: 10,
  PUT_EXTENT: 11,
  PUT_BLOB: 12,
  FLUSH: 13,
  COMMIT: 14,
  LIST: 15,
  INDEX: 16,
  GET_EXTENT: 17,
  GET_BLOB: 18,
  REMOVE: 19,
  /** server → client: extent record answering GET_EXTENT. */
  EXTENT: 20,
  /** server → client: blob record answering GET_BLOB. */
  BLOB: 21,
  /** Flush and check a checkpoint against the expected extents, without committing it. */
  PREPARE: 22,
  /** Pages record: patch parts of an extent already sent (pre-copy re-sends of dirty pages). */
  PUT_PAGES: 23,
  /** Keeps an idle connection from timing out; answered with OK. */
  PING: 24,
} as const;
export type FrameType = (typeof FRAME)[keyof typeof FRAME];

export const MAX_EXTENT_BYTES = 4 * 1024 * 1024;
/**
 * Device state is the largest blob: the stream reader accepts up to 64 MiB of it
 * (DEFAULT_MAX_DEVICE_STATE_BYTES), so a blob may be as large. Only authenticated peers get past
 * the 1 KiB pre-auth cap, and a blob counts against the connection's budget like extents do.
 */
export const MAX_BLOB_BYTES = 64 * 1024 * 1024;
export const MAX_CONTROL_BYTES = 1024 * 1024;
export const SHA256_BYTES = 32;
/** Room for later versions' HELLO (version 1 sends a 32-byte nonce); also the pre-auth frame cap. */
export const MAX_HELLO_BYTES = 1024;
/** Largest record head: id (1+255), name (2+65535 is allowed by the field, 1 KiB by policy), index, offset, sum. */
export const MAX_NAME_BYTES = 1024;
const MAX_RECORD_HEAD = 1 + 255 + 2 + MAX_NAME_BYTES + 4 + 8 + SHA256_BYTES;
/** Runs in one pages record: one per 4 KiB page of the largest extent. */
export const MAX_RUNS = MAX_EXTENT_BYTES / 4096;

/** Largest payload a frame of `type` may carry, or -1 for a type this version does not know. */
export function maxPayload(type: number): number {
  switch (type) {
    case FRAME.HELLO:
      return MAX_HELLO_BYTES;
    case FRAME.CHALLENGE:
    case FRAME.AUTH:
    case FRAME.WELCOME:
      return 64;
    case FRAME.PUT_EXTENT:
    case FRAME.EXTENT:
      return MAX_RECORD_HEAD + MAX_EXTENT_BYTES;
    case FRAME.PUT_PAGES:
      return MAX_RECORD_HEAD + 2 + MAX_RUNS * 8 + MAX_EXTENT_BYTES;
    case FRAME.PUT_BLOB:
    case FRAME.BLOB:
      return MAX_RECORD_HEAD + MAX_BLOB_BYTES;
    case FRAME.ERROR:
    case FRAME.OK:
    case FRAME.BEGIN:
    case FRAME.FLUSH:
    case FRAME.COMMIT:
    case FRAME.PREPARE:
    case FRAME.PING:
    case FRAME.LIST:
    case FRAME.INDEX:
    case FRAME.GET_EXTENT:
    case FRAME.GET_BLOB:
    case FRAME.REMOVE:
      return MAX_CONTROL_BYTES;
    default:
      return -1;
  }
}

export function frameName(type: number): string {
  for (const [name, value] of Object.entries(FRAME)) if (value === type) return name;
  return `type ${type}`;
}

/** The 16-byte header of a frame whose payload is `length` bytes. */
export function encodeHeader(
  type: FrameType,
  requestId: number,
  length: number,
  version = PROTOCOL_VERSION,
): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES);
  b.writeUInt32BE(MAGIC, H.magic);
  b.writeUInt16BE(version, H.version);
  b.writeUInt8(type, H.type);
  b.writeUInt8(0, H.flags);
  b.writeUInt32BE(requestId >>> 0, H.requestId);
  b.writeUInt32BE(length, H.length);
  return b;
}

/** A whole frame as the list of buffers to write (header first); the payload parts are not copied. */
export function frameParts(
  type: FrameType,
  requestId: number,
  parts: readonly Buffer[],
  version = PROTOCOL_VERSION,
): Buffer[] {
  let length = 0;
  for (const p of parts) length += p.length;
  const limit = maxPayload(type);
  if (length > limit) throw new RangeError(`${frameName(type)} frame of ${length} bytes exceeds ${limit}`);
  return [encodeHeader(type, requestId, length, version), ...parts];
}

export function jsonPayload(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

/** Parses a control payload; the caller validates the shape. */
export function parseJson(payload: Buffer): unknown {
  try {
    return JSON.parse(payload.toString('utf8'));
  } catch {
    throw new ProtocolError('control frame payload is not JSON', 0);
  }
}

export type FrameHandler = (type: number, requestId: number, payload: Buffer, version: number) => void;

const EMPTY = Buffer.alloc(0);

/**
 * Incremental frame decoder over socket chunks. A payload that lies within one chunk is handed out
 * as a view of that chunk (no copy); one that spans chunks is assembled in a buffer of exactly its
 * size, allocated once the header has been checked, so an oversized or unknown frame is refused
 * before any of it is buffered. A header split across chunks goes through one reused 16-byte
 * buffer. Payloads stay valid after the handler returns (socket chunks are never reused).
 *
 * The decoder does not judge the version (that is the session's job, so it can answer a peer of
 * another version in words); after the first error it refuses all further input.
 */
export class FrameDecoder {
  private readonly head = Buffer.alloc(HEADER_BYTES);
  private headFill = 0;
  private type = 0;
  private version = 0;
  private requestId = 0;
  private length = -1; // -1: reading a header
  private body: Buffer | undefined;
  private bodyFill = 0;
  private offset = 0;
  private failed: ProtocolError | undefined;
  /**
   * Extra cap on every payload, below the per-type limits: a server keeps it at MAX_HELLO_BYTES
   * until the peer has authenticated, so a stranger cannot make it buffer megabytes.
   */
  payloadCap = Number.POSITIVE_INFINITY;

  constructor(private readonly onFrame: FrameHandler) {}

  /** Bytes consumed so far (for error messages). */
  get bytesRead(): number {
    return this.offset;
  }

  /** True between frames: no partial frame is buffered. */
  get atBoundary(): boolean {
    return this.length < 0 && this.headFill === 0;
  }

  /** Decodes what `chunk` completes; throws ProtocolError on malformed input (and on every later call). */
  push(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    let pos = 0;
    while (pos < chunk.length) {
      if (this.length < 0) {
        if (this.headFill === 0 && chunk.length - pos >= HEADER_BYTES) {
          this.parseHeader(chunk, pos);
          pos += HEADER_BYTES;
          this.offset += HEADER_BYTES;
        } else {
          const n = Math.min(HEADER_BYTES - this.headFill, chunk.length - pos);
          chunk.copy(this.head, this.headFill, pos, pos + n);
          this.headFill += n;
          pos += n;
          this.offset += n;
          if (this.headFill < HEADER_BYTES) return;
          this.headFill = 0;
          this.parseHeader(this.head, 0);
        }
        if (this.length === 0) this.emit(EMPTY);
        continue;
      }
      const want = this.length - this.bodyFill;
      if (this.bodyFill === 0 && chunk.length - pos >= want) {
        const payload = chunk.subarray(pos, pos + want);
        pos += want;
        this.offset += want;
        this.emit(payload);
        continue;
      }
      this.body ??= Buffer.allocUnsafe(this.length);
      const n = Math.min(want, chunk.length - pos);
      chunk.copy(this.body, this.bodyFill, pos, pos + n);
      this.bodyFill += n;
      pos += n;
      this.offset += n;
      if (this.bodyFill === this.length) {
        const payload = this.body;
        this.body = undefined;
        this.bodyFill = 0;
        this.emit(payload);
      }
    }
  }

  private parseHeader(b: Buffer, at: number): void {
    const start = this.offset - (b === this.head ? HEADER_BYTES : 0);
    const magic = b.readUInt32BE(at + H.magic);
    if (magic !== MAGIC)
      this.fail(`not a tlc memory-server frame (magic 0x${magic.toString(16).padStart(8, '0')})`, start);
    this.version = b.readUInt16BE(at + H.version);
    this.type = b.readUInt8(at + H.type);
    const flags = b.readUInt8(at + H.flags);
    if (flags !== 0)
      this.fail(`unknown flags 0x${flags.toString(16)} in ${frameName(this.type)} frame`, start);
    this.requestId = b.readUInt32BE(at + H.requestId);
    const length = b.readUInt32BE(at + H.length);
    const limit = Math.min(maxPayload(this.type), this.payloadCap);
    // A peer of another version may use types we do not know: only its ERROR frames must be readable.
    if (limit < 0) this.fail(`unknown frame type ${this.type} (protocol version ${this.version})`, start);
    if (length > limit)
      this.fail(`${frameName(this.type)} frame of ${length} bytes exceeds the limit of ${limit}`, start);
    this.length = length;
  }

  private emit(payload: Buffer): void {
    const { type, requestId, version } = this;
    this.length = -1;
    this.onFrame(type, requestId, payload, version);
  }

  private fail(message: string, offset: number): never {
    this.failed = new ProtocolError(message, offset);
    throw this.failed;
  }
}

/** Reads records field by field, failing with the field's offset when the payload is too short. */
class RecordReader {
  pos = 0;
  constructor(private readonly b: Buffer) {}
  need(n: number, what: string): void {
    if (this.pos + n > this.b.length) throw new ProtocolError(`record truncated in ${what}`, this.pos);
  }
  u8(what: string): number {
    this.need(1, what);
    return this.b.readUInt8(this.pos++);
  }
  u16(what: string): number {
    this.need(2, what);
    const v = this.b.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.b.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(what: string): number {
    this.need(8, what);
    const v = this.b.readBigUInt64BE(this.pos);
    this.pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`${what} too large`, this.pos - 8);
    return Number(v);
  }
  bytes(n: number, what: string): Buffer {
    this.need(n, what);
    const v = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
  text(n: number, what: string): string {
    return this.bytes(n, what).toString('utf8');
  }
  rest(): Buffer {
    return this.b.subarray(this.pos);
  }
}

export interface ExtentRecord {
  ckpt: string;
  block: string;
  index: number;
  offset: number;
  sha256: Buffer;
  data: Buffer;
}

export interface BlobRecord {
  ckpt: string;
  name: string;
  sha256: Buffer;
  data: Buffer;
}

function checkedText(value: string, max: number, what: string): Buffer {
  const b = Buffer.from(value, 'utf8');
  if (b.length === 0 || b.length > max)
    throw new RangeError(`${what} must be 1..${max} bytes (got ${b.length})`);
  return b;
}

/** The record head of an extent; the data follows it on the wire as its own buffer (not copied). */
export function encodeExtentHead(r: Omit<ExtentRecord, 'data'>): Buffer {
  const id = checkedText(r.ckpt, 255, 'checkpoint id');
  const name = checkedText(r.block, MAX_NAME_BYTES, 'block name');
  if (r.sha256.length !== SHA256_BYTES) throw new RangeError('sha256 must be 32 bytes');
  const b = Buffer.allocUnsafe(1 + id.length + 2 + name.length + 4 + 8 + SHA256_BYTES);
  let p = b.writeUInt8(id.length, 0);
  p += id.copy(b, p);
  p = b.writeUInt16BE(name.length, p);
  p += name.copy(b, p);
  p = b.writeUInt32BE(r.index, p);
  p = b.writeBigUInt64BE(BigInt(r.offset), p);
  r.sha256.copy(b, p);
  return b;
}

export function decodeExtent(payload: Buffer): ExtentRecord {
  const r = new RecordReader(payload);
  const ckpt = r.text(r.u8('checkpoint id length'), 'checkpoint id');
  const block = r.text(r.u16('block name length'), 'block name');
  const index = r.u32('extent index');
  const offset = r.u64('extent offset');
  const sha256 = r.bytes(SHA256_BYTES, 'extent checksum');
  const data = r.rest();
  if (data.length > MAX_EXTENT_BYTES)
    throw new ProtocolError(`extent of ${data.length} bytes exceeds ${MAX_EXTENT_BYTES}`, r.pos);
  return { ckpt, block, index, offset, sha256, data };
}

export interface PageRun {
  /** Byte offset within the extent. */
  at: number;
  data: Buffer;
}

export interface PagesRecord {
  ckpt: string;
  block: string;
  index: number;
  runs: PageRun[];
  /** SHA-256 of the runs' data, concatenated in order. */
  sha256: Buffer;
}

/** Head, run table and checksum of a pages record; the runs' data follow as their own buffers. */
export function encodePagesHead(r: PagesRecord): Buffer {
  const id = checkedText(r.ckpt, 255, 'checkpoint id');
  const name = checkedText(r.block, MAX_NAME_BYTES, 'block name');
  if (r.runs.length === 0 || r.runs.length > MAX_RUNS)
    throw new RangeError(`a pages record holds 1..${MAX_RUNS} runs`);
  if (r.sha256.length !== SHA256_BYTES) throw new RangeError('sha256 must be 32 bytes');
  const b = Buffer.allocUnsafe(1 + id.length + 2 + name.length + 4 + 2 + r.runs.length * 8 + SHA256_BYTES);
  let p = b.writeUInt8(id.length, 0);
  p += id.copy(b, p);
  p = b.writeUInt16BE(name.length, p);
  p += name.copy(b, p);
  p = b.writeUInt32BE(r.index, p);
  p = b.writeUInt16BE(r.runs.length, p);
  for (const run of r.runs) {
    p = b.writeUInt32BE(run.at, p);
    p = b.writeUInt32BE(run.data.length, p);
  }
  r.sha256.copy(b, p);
  return b;
}

export function decodePages(payload: Buffer): PagesRecord {
  const r = new RecordReader(payload);
  const ckpt = r.text(r.u8('checkpoint id length'), 'checkpoint id');
  const block = r.text(r.u16('block name length'), 'block name');
  const index = r.u32('extent index');
  const count = r.u16('run count');
  if (count === 0 || count > MAX_RUNS)
    throw new ProtocolError(`${count} runs in a pages record (1..${MAX_RUNS})`, r.pos - 2);
  const table: Array<{ at: number; length: number }> = [];
  let total = 0;
  for (let i = 0; i < count; i++) {
    const at = r.u32('run offset');
    const length = r.u32('run length');
    if (length === 0 || at + length > MAX_EXTENT_BYTES)
      throw new ProtocolError(
        `run ${at}+${length} outside an extent of at most ${MAX_EXTENT_BYTES} bytes`,
        r.pos - 8,
      );
    table.push({ at, length });
    total += length;
  }
  const sha256 = r.bytes(SHA256_BYTES, 'pages checksum');
  if (payload.length - r.pos !== total)
    throw new ProtocolError(
      `pages record carries ${payload.length - r.pos} data bytes, its runs say ${total}`,
      r.pos,
    );
  const runs = table.map((t) => ({ at: t.at, data: r.bytes(t.length, 'run data') }));
  return { ckpt, block, index, runs, sha256 };
}

export function encodeBlobHead(r: Omit<BlobRecord, 'data'>): Buffer {
  const id = checkedText(r.ckpt, 255, 'checkpoint id');
  const name = checkedText(r.name, 255, 'blob name');
  if (r.sha256.length !== SHA256_BYTES) throw new RangeError('sha256 must be 32 bytes');
  const b = Buffer.allocUnsafe(1 + id.length + 1 + name.length + SHA256_BYTES);
  let p = b.writeUInt8(id.length, 0);
  p += id.copy(b, p);
  p = b.writeUInt8(name.length, p);
  p += name.copy(b, p);
  r.sha256.copy(b, p);
  return b;
}

export function decodeBlob(payload: Buffer): BlobRecord {
  const r = new RecordReader(payload);
  const ckpt = r.text(r.u8('checkpoint id length'), 'checkpoint id');
  const name = r.text(r.u8('blob name length'), 'blob name');
  const sha256 = r.bytes(SHA256_BYTES, 'blob checksum');
  const data = r.rest();
  if (data.length > MAX_BLOB_BYTES)
    throw new ProtocolError(`blob of ${data.length} bytes exceeds ${MAX_BLOB_BYTES}`, r.pos);
  return { ckpt, name, sha256, data };
}
