/**
 * A memory server's data directory, and the file format of each stored extent or blob.
 *
 *   <data>/server-id                            random id, names this server's share in --flush-to
 *   <data>/pending/<ckpt>/extents/<block>/<k>   extent k of RAM block <block>, being received
 *   <data>/pending/<ckpt>/blobs/<name>          manifest, device state, config ...
 *   <data>/committed/<ckpt>/...                 the same after commit, plus commit.json
 *   <flush-to>/<server-id>/<ckpt>/...           the committed copy on the shared file system
 *
 * Nothing a client sends becomes a path without passing through here: checkpoint ids and blob
 * names must match NAME_RE (no slash, no leading dot, so no `..`), block names (QEMU RAM block ids
 * such as `/rom@etc/acpi/tables` contain slashes) are percent-encoded behind a `b-` prefix, extent
 * indices are integers. `inside()` then checks every path it builds against the data directory.
 *
 * Stored object (extent or blob), one file each:
 *
 * | offset | size | field                           |
 * |--------|------|---------------------------------|
 * | 0      | 4    | magic `TLMX` (0x544c4d58)       |
 * | 4      | 2    | format version (1)              |
 * | 6      | 2    | reserved, 0                     |
 * | 8      | 8    | byte offset of the extent (0 for blobs) |
 * | 16     | 4    | data length                     |
 * | 20     | 32   | SHA-256 of the data, as the writer sent it |
 * | 52     | ...  | data                            |
 *
 * The server stores the client's checksum beside the data and hands both back unverified: the
 * restoring client checks them, so a byte flipped on this server's disk is caught by the client,
 * which then takes another replica. After pages of an extent were patched (PUT_PAGES), the server
 * computes the new checksum itself (each patch's own checksum was verified on receipt).
 */
import path from 'node:path';
import { Refusal } from './errors.js';
import { MAX_NAME_BYTES, SHA256_BYTES } from './protocol.js';

export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
/** QEMU RAM block ids: printable ASCII without backslash; at most MAX_NAME_BYTES. */
const BLOCK_RE = /^[\x21-\x5b\x5d-\x7e]+$/;

export const OBJECT_MAGIC = 0x544c4d58;
export const OBJECT_VERSION = 1;
export const OBJECT_HEAD_BYTES = 52;
/** Field offsets of the stored-object header (table above). */
export const OBJECT_FIELD = { magic: 0, version: 4, offset: 8, length: 16, sha256: 20 } as const;

export function checkName(value: unknown, what: string): string {
  if (typeof value !== 'string' || !NAME_RE.test(value))
    throw new Refusal(
      'bad-request',
      `invalid ${what} ${JSON.stringify(value)}: must match ${NAME_RE.source}`,
    );
  return value;
}

export function checkBlock(value: unknown): string {
  if (typeof value !== 'string' || value.length > MAX_NAME_BYTES || !BLOCK_RE.test(value))
    throw new Refusal('bad-request', `invalid block name ${JSON.stringify(value)}`);
  return value;
}

export function checkIndex(value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 0xffffffff)
    throw new Refusal('bad-request', `invalid extent index ${JSON.stringify(value)}`);
  return value;
}

/** `b-` + the name with every byte outside [A-Za-z0-9_.-] as %XX: one safe path component. */
export function blockDir(block: string): string {
  return 'b-' + block.replace(/[^A-Za-z0-9_.-]/g, (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0'));
}

export function blockFromDir(dir: string): string | undefined {
  if (!dir.startsWith('b-')) return undefined;
  try {
    return decodeURIComponent(dir.slice(2));
  } catch {
    return undefined;
  }
}

export class Layout {
  readonly pending: string;
  readonly committed: string;
  constructor(readonly root: string) {
    this.root = path.resolve(root);
    this.pending = path.join(this.root, 'pending');
    this.committed = path.join(this.root, 'committed');
  }

  pendingDir(ckpt: string): string {
    return this.inside(path.join(this.pending, checkName(ckpt, 'checkpoint id')));
  }

  committedDir(ckpt: string): string {
    return this.inside(path.join(this.committed, checkName(ckpt, 'checkpoint id')));
  }

  /** Belt and braces: whatever the checks above let through must still land under the data dir. */
  inside(p: string): string {
    const rel = path.relative(this.root, p);
    if (rel === '' || rel.startsWith('..') || path.isAbsolute(rel))
      throw new Refusal('bad-request', 'path escapes the data directory');
    return p;
  }
}

/** Paths inside one checkpoint directory (pending, committed or flushed: same shape). */
export const ckptFiles = {
  extents: (dir: string): string => path.join(dir, 'extents'),
  blockDir: (dir: string, block: string): string => path.join(dir, 'extents', blockDir(block)),
  extent: (dir: string, block: string, index: number): string =>
    path.join(dir, 'extents', blockDir(block), String(index)),
  blobs: (dir: string): string => path.join(dir, 'blobs'),
  blob: (dir: string, name: string): string => path.join(dir, 'blobs', name),
  commit: (dir: string): string => path.join(dir, 'commit.json'),
};

export function encodeObjectHead(offset: number, length: number, sha256: Buffer): Buffer {
  const b = Buffer.alloc(OBJECT_HEAD_BYTES);
  b.writeUInt32BE(OBJECT_MAGIC, OBJECT_FIELD.magic);
  b.writeUInt16BE(OBJECT_VERSION, OBJECT_FIELD.version);
  b.writeBigUInt64BE(BigInt(offset), OBJECT_FIELD.offset);
  b.writeUInt32BE(length, OBJECT_FIELD.length);
  sha256.copy(b, OBJECT_FIELD.sha256, 0, SHA256_BYTES);
  return b;
}

export interface StoredObject {
  offset: number;
  sha256: Buffer;
  data: Buffer;
}

/** Splits a stored object file; the checksum is NOT verified here (the client does that). */
export function decodeObject(file: Buffer, name: string): StoredObject {
  if (file.length < OBJECT_HEAD_BYTES || file.readUInt32BE(OBJECT_FIELD.magic) !== OBJECT_MAGIC)
    throw new Refusal('corrupt', `${name}: not a stored extent (bad magic or truncated)`);
  const version = file.readUInt16BE(OBJECT_FIELD.version);
  if (version !== OBJECT_VERSION)
    throw new Refusal(
      'corrupt',
      `${name}: stored format version ${version}, this server reads ${OBJECT_VERSION}`,
    );
  const length = file.readUInt32BE(OBJECT_FIELD.length);
  if (file.length !== OBJECT_HEAD_BYTES + length)
    throw new Refusal(
      'corrupt',
      `${name}: ${file.length - OBJECT_HEAD_BYTES} data bytes, header says ${length}`,
    );
  return {
    offset: Number(file.readBigUInt64BE(OBJECT_FIELD.offset)),
    sha256: file.subarray(OBJECT_FIELD.sha256, OBJECT_FIELD.sha256 + SHA256_BYTES),
    data: file.subarray(OBJECT_HEAD_BYTES),
  };
}
