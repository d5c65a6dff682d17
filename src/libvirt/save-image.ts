/**
 * libvirt's QEMU save-image format (what `virsh save` writes and `virsh restore` loads), as of
 * libvirt 9.0 (src/qemu/qemu_saveimage.h, virQEMUSaveHeader and virQEMUSaveDataWrite):
 *
 *   offset        bytes     field
 *   0             16        magic: "LibvirtQemudSave" (no NUL); "LibvirtQemudPart" while being written
 *   16            4         version = 2
 *   20            4         data_len: bytes from 92 to the start of the QEMU stream
 *   24            4         was_running: 1 = resume the guest after loading, 0 = leave it paused
 *   28            4         compressed: 0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop (9.0 has no zstd)
 *   32            4         cookieOffset: where the cookie starts in the data (0 = no cookie)
 *   36            56        unused[14], zero
 *   92            data_len  domain XML, NUL; [cookie XML, NUL]; zero padding
 *   92+data_len   ...       the QEMU migration stream ("QEVM" ...), to the end of the file
 *
 * The u32 fields are in the writer's byte order; libvirt byte-swaps a header whose version reads
 * above 2, so little-endian (x86-64, where QEMU and libvirt run for tlc) is what this module writes.
 * libvirt pads the data with 64 KiB of zeros so that `virsh save-image-define` can later store a
 * larger XML in place; so does this module. The cookie (libvirt's CPU and slirp details) is
 * optional: without one libvirt restores from the XML alone.
 *
 * An image is written under the partial magic, made durable, and only then given its final magic
 * (as libvirt does): an interrupted write never looks like a complete image.
 */
import { open, rm, type FileHandle } from 'node:fs/promises';
import { PersistError, TlcError } from '../core/errors.js';

export const SAVE_IMAGE = {
  MAGIC: 'LibvirtQemudSave',
  PARTIAL_MAGIC: 'LibvirtQemudPart',
  VERSION: 2,
  /** sizeof(virQEMUSaveHeader). */
  HEADER_BYTES: 92,
  /** Zero padding after the XML (and cookie), as libvirt adds. */
  DATA_PADDING: 64 * 1024,
  /** Largest data_len this module writes or accepts: the XML of a domain is kilobytes. */
  MAX_DATA_BYTES: 64 * 1024 * 1024,
} as const;

/** libvirt 9.0's virQEMUSaveFormat values. */
export const SAVE_FORMAT = { raw: 0, gzip: 1, bzip2: 2, xz: 3, lzop: 4 } as const;
export type SaveFormat = keyof typeof SAVE_FORMAT;

/** Field offsets in the header (see the table above). */
const FIELD = {
  magic: 0,
  version: 16,
  dataLen: 20,
  wasRunning: 24,
  format: 28,
  cookieOffset: 32,
  unused: 36,
} as const;
const MAGIC_BYTES = 16;

export interface SaveImageHeader {
  /** False while the image is being written (partial magic). */
  complete: boolean;
  version: number;
  dataLen: number;
  wasRunning: boolean;
  format: SaveFormat;
  cookieOffset: number;
}

export interface SaveImagePrefix {
  header: SaveImageHeader;
  /** The domain XML (up to its NUL). */
  xml: string;
  cookie?: string;
  /** Where the QEMU migration stream starts: 92 + data_len. */
  streamOffset: number;
}

export interface SaveImageOptions {
  /** The domain XML, as `virsh dumpxml --migratable DOM` prints it. */
  xml: string;
  /** Resume the guest once loaded (a checkpoint of a running guest). */
  wasRunning: boolean;
  /** libvirt's save cookie (`<qemu-migration>...`), if there is one to keep. */
  cookie?: string;
  /** Zero bytes after the XML and cookie; default 64 KiB, as libvirt. */
  padding?: number;
}

/** A malformed or unsupported save image. */
export class SaveImageError extends TlcError {
  constructor(message: string) {
    super('E_CORRUPT', message);
  }
}

/** The 92-byte header plus the data (XML, cookie, padding): everything before the QEMU stream. */
export function encodeSaveImagePrefix(opts: SaveImageOptions, complete = true): Buffer {
  const xml = Buffer.from(opts.xml, 'utf8');
  const cookie = opts.cookie === undefined ? undefined : Buffer.from(opts.cookie, 'utf8');
  if (xml.includes(0) || cookie?.includes(0))
    throw new SaveImageError('The domain XML or cookie contains a NUL byte');
  if (!/^\s*<domain[\s>]/.test(opts.xml))
    throw new SaveImageError('The save image XML is not a <domain> element');
  const padding = opts.padding ?? SAVE_IMAGE.DATA_PADDING;
  if (!Number.isSafeInteger(padding) || padding < 0) throw new SaveImageError(`Bad padding ${padding}`);
  const xmlBytes = xml.length + 1;
  const dataLen = xmlBytes + (cookie ? cookie.length + 1 : 0) + padding;
  if (dataLen > SAVE_IMAGE.MAX_DATA_BYTES) {
    throw new SaveImageError(
      `The save image data would be ${dataLen} bytes, over ${SAVE_IMAGE.MAX_DATA_BYTES}`,
    );
  }
  const out = Buffer.alloc(SAVE_IMAGE.HEADER_BYTES + dataLen);
  out.write(complete ? SAVE_IMAGE.MAGIC : SAVE_IMAGE.PARTIAL_MAGIC, FIELD.magic, MAGIC_BYTES, 'latin1');
  out.writeUInt32LE(SAVE_IMAGE.VERSION, FIELD.version);
  out.writeUInt32LE(dataLen, FIELD.dataLen);
  out.writeUInt32LE(opts.wasRunning ? 1 : 0, FIELD.wasRunning);
  out.writeUInt32LE(SAVE_FORMAT.raw, FIELD.format);
  out.writeUInt32LE(cookie ? xmlBytes : 0, FIELD.cookieOffset);
  xml.copy(out, SAVE_IMAGE.HEADER_BYTES);
  if (cookie) cookie.copy(out, SAVE_IMAGE.HEADER_BYTES + xmlBytes);
  return out;
}

/** Decodes the 92-byte header at the start of `buf`; rejects what libvirt 9.0 would reject. */
export function decodeSaveImageHeader(buf: Buffer): SaveImageHeader {
  if (buf.length < SAVE_IMAGE.HEADER_BYTES) {
    throw new SaveImageError(`A save image header is ${SAVE_IMAGE.HEADER_BYTES} bytes, got ${buf.length}`);
  }
  const magic = buf.toString('latin1', FIELD.magic, FIELD.magic + MAGIC_BYTES);
  if (magic !== SAVE_IMAGE.MAGIC && magic !== SAVE_IMAGE.PARTIAL_MAGIC) {
    throw new SaveImageError(
      `Not a libvirt save image: magic ${JSON.stringify(magic)} at offset ${FIELD.magic}`,
    );
  }
  let le = true;
  let version = buf.readUInt32LE(FIELD.version);
  if (version > SAVE_IMAGE.VERSION) {
    le = false;
    version = buf.readUInt32BE(FIELD.version);
  }
  if (version !== SAVE_IMAGE.VERSION) {
    throw new SaveImageError(
      `Save image version ${version} at offset ${FIELD.version}: only version ${SAVE_IMAGE.VERSION} is supported`,
    );
  }
  const u32 = (at: number): number => (le ? buf.readUInt32LE(at) : buf.readUInt32BE(at));
  const dataLen = u32(FIELD.dataLen);
  if (dataLen === 0 || dataLen > SAVE_IMAGE.MAX_DATA_BYTES) {
    throw new SaveImageError(`Save image data length ${dataLen} at offset ${FIELD.dataLen} is out of range`);
  }
  const formatCode = u32(FIELD.format);
  const format = (Object.keys(SAVE_FORMAT) as SaveFormat[]).find((k) => SAVE_FORMAT[k] === formatCode);
  if (format === undefined) {
    throw new SaveImageError(`Unknown save image format ${formatCode} at offset ${FIELD.format}`);
  }
  const cookieOffset = u32(FIELD.cookieOffset);
  if (cookieOffset >= dataLen) {
    throw new SaveImageError(
      `Save image cookie offset ${cookieOffset} at offset ${FIELD.cookieOffset} is past the data`,
    );
  }
  return {
    complete: magic === SAVE_IMAGE.MAGIC,
    version,
    dataLen,
    wasRunning: u32(FIELD.wasRunning) !== 0,
    format,
    cookieOffset,
  };
}

/** Header, XML and cookie from the first 92 + data_len bytes of an image. */
export function decodeSaveImagePrefix(buf: Buffer): SaveImagePrefix {
  const header = decodeSaveImageHeader(buf);
  const streamOffset = SAVE_IMAGE.HEADER_BYTES + header.dataLen;
  if (buf.length < streamOffset) {
    throw new SaveImageError(
      `Save image truncated: its data ends at ${streamOffset}, got ${buf.length} bytes`,
    );
  }
  const data = buf.subarray(SAVE_IMAGE.HEADER_BYTES, streamOffset);
  const xmlEnd = header.cookieOffset > 0 ? header.cookieOffset : data.length;
  const cstr = (b: Buffer): string => {
    const nul = b.indexOf(0);
    return b.toString('utf8', 0, nul < 0 ? b.length : nul);
  };
  const xml = cstr(data.subarray(0, xmlEnd));
  const prefix: SaveImagePrefix = { header, xml, streamOffset };
  if (header.cookieOffset > 0) prefix.cookie = cstr(data.subarray(header.cookieOffset));
  return prefix;
}

/**
 * Writes a save image: prefix under the partial magic, then the stream as it is pushed, then
 * fsync, the final magic, fsync. One write at a time, in order; `write` resolves once its chunk is
 * written. A failed or aborted image is removed.
 */
export class SaveImageWriter {
  private position: number;
  private chain: Promise<void> = Promise.resolve();
  private failure: unknown;
  private done = false;

  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly streamOffset: number,
  ) {
    this.position = streamOffset;
  }

  static async create(path: string, opts: SaveImageOptions): Promise<SaveImageWriter> {
    const prefix = encodeSaveImagePrefix(opts, false);
    let fh: FileHandle;
    try {
      fh = await open(path, 'w', 0o600);
    } catch (err) {
      throw new PersistError('create', path, err);
    }
    try {
      await fh.write(prefix, 0, prefix.length, 0);
    } catch (err) {
      await fh.close().catch(() => undefined);
      await rm(path, { force: true });
      throw new PersistError('write', path, err);
    }
    return new SaveImageWriter(fh, path, prefix.length);
  }

  /** Bytes of QEMU stream written or queued so far. */
  get streamBytes(): number {
    return this.position - this.streamOffset;
  }

  /**
   * Appends a chunk of the QEMU stream (the chunk must not be reused until this resolves). Chunks
   * queue in memory while the disk is slower than the stream: await the writes to bound that.
   */
  write(chunk: Buffer): Promise<void> {
    if (this.done)
      return Promise.reject(new PersistError('write', this.path, new Error('image already finished')));
    const at = this.position;
    this.position += chunk.length;
    this.chain = this.chain.then(async () => {
      if (this.failure !== undefined) return;
      try {
        let off = 0;
        while (off < chunk.length) {
          const { bytesWritten } = await this.fh.write(chunk, off, chunk.length - off, at + off);
          off += bytesWritten;
        }
      } catch (err) {
        this.failure = err;
      }
    });
    const written = this.chain.then(() => {
      if (this.failure !== undefined) throw new PersistError('write', this.path, this.failure);
    });
    // A caller may await only its last write (or finish(), which reports the failure too).
    written.catch(() => undefined);
    return written;
  }

  /** Makes the image durable and complete; returns the file's size. */
  async finish(): Promise<number> {
    this.done = true;
    await this.chain;
    try {
      if (this.failure !== undefined) throw this.failure;
      await this.fh.sync();
      const magic = Buffer.from(SAVE_IMAGE.MAGIC, 'latin1');
      await this.fh.write(magic, 0, magic.length, FIELD.magic);
      await this.fh.sync();
      await this.fh.close();
      return this.position;
    } catch (err) {
      await this.abort();
      throw err instanceof PersistError ? err : new PersistError('write', this.path, err);
    }
  }

  /** Closes and removes the partial image. */
  async abort(): Promise<void> {
    this.done = true;
    await this.chain;
    await this.fh.close().catch(() => undefined);
    await rm(this.path, { force: true });
  }
}

/** Writes a whole image from a stream source (a socket, a file stream, an array of chunks). */
export async function writeSaveImage(
  path: string,
  opts: SaveImageOptions,
  stream: AsyncIterable<Buffer> | Iterable<Buffer>,
): Promise<{ bytes: number; streamOffset: number }> {
  const writer = await SaveImageWriter.create(path, opts);
  try {
    for await (const chunk of stream) await writer.write(chunk);
  } catch (err) {
    await writer.abort();
    throw err;
  }
  const bytes = await writer.finish();
  return { bytes, streamOffset: writer.streamOffset };
}
