/**
 * A writer for the "newc" cpio format (the one the Linux kernel unpacks as an initramfs).
 * Written here so that building the guest does not depend on the host having `cpio`.
 *
 * Each entry is a 110-byte ASCII header ("070701" + 13 fields of 8 hex digits), the
 * NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4.
 * The archive ends with an entry named "TRAILER!!!". Timestamps and owners are fixed
 * (mtime 0, root) so the same inputs always give the same bytes.
 */

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; data: Buffer; mode?: number }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'chardev'; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new RangeError(`cpio field out of range: ${n}`);
  return n.toString(16).padStart(8, '0');
}

function pad4(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

function record(
  ino: number,
  mode: number,
  name: string,
  data: Buffer,
  rdev = { major: 0, minor: 0 },
): Buffer[] {
  const nameBytes = Buffer.from(`${name}\0`, 'utf8');
  const header = Buffer.from(
    '070701' +
      [
        ino,
        mode,
        0, // uid
        0, // gid
        (mode & 0o170000) === S_IFDIR ? 2 : 1, // nlink
        0, // mtime: fixed for reproducible archives
        data.length,
        0, // devmajor
        0, // devminor
        rdev.major,
        rdev.minor,
        nameBytes.length,
        0, // check (only used by the "070702" crc variant)
      ]
        .map(hex8)
        .join(''),
    'ascii',
  );
  return [header, nameBytes, pad4(header.length + nameBytes.length), data, pad4(data.length)];
}

/** Builds an uncompressed newc archive. Paths are relative to the archive root ("bin/sh"). */
export function newcArchive(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, '');
    if (name === '' || name.split('/').includes('..')) throw new Error(`bad cpio path: ${e.path}`);
    switch (e.type) {
      case 'dir':
        parts.push(...record(ino++, S_IFDIR | (e.mode ?? 0o755), name, Buffer.alloc(0)));
        break;
      case 'file':
        parts.push(...record(ino++, S_IFREG | (e.mode ?? 0o644), name, e.data));
        break;
      case 'symlink':
        parts.push(...record(ino++, S_IFLNK | 0o777, name, Buffer.from(e.target, 'utf8')));
        break;
      case 'chardev':
        parts.push(
          ...record(ino++, S_IFCHR | (e.mode ?? 0o600), name, Buffer.alloc(0), {
            major: e.major,
            minor: e.minor,
          }),
        );
        break;
    }
  }
  parts.push(...record(0, 0, 'TRAILER!!!', Buffer.alloc(0)));
  return Buffer.concat(parts);
}
