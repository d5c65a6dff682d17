import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PersistError } from './errors.js';

function step<T>(call: string, target: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw new PersistError(call, target, err);
  }
}

/** fsync a directory so a rename inside it is durable. */
export function fsyncDir(dir: string): void {
  const fd = step('open', dir, () => fs.openSync(dir, 'r'));
  try {
    step('fsync', dir, () => fs.fsyncSync(fd));
  } finally {
    fs.closeSync(fd);
  }
}

/** Write, fsync, rename, fsync the directory: readers see the old file or the new one, never half. */
export function writeFileAtomic(file: string, data: string | Uint8Array, mode: number): void {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const fd = step('create', tmp, () => fs.openSync(tmp, 'w', mode));
  try {
    step('write', tmp, () => fs.writeFileSync(fd, data));
    step('fsync', tmp, () => fs.fsyncSync(fd));
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  fs.closeSync(fd);
  step('rename', file, () => fs.renameSync(tmp, file));
  fsyncDir(path.dirname(file));
}

/** Size and SHA-256 of a whole file, read through one 4 MiB buffer; `fsync` first if asked. */
export function hashFile(file: string, opts: { fsync?: boolean } = {}): { bytes: number; sha256: string } {
  const fd = step('open', file, () => fs.openSync(file, 'r'));
  try {
    if (opts.fsync) step('fsync', file, () => fs.fsyncSync(fd));
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    let bytes = 0;
    for (;;) {
      const n = step('read', file, () => fs.readSync(fd, buf, 0, buf.length, bytes));
      if (n <= 0) break;
      hash.update(buf.subarray(0, n));
      bytes += n;
    }
    return { bytes, sha256: hash.digest('hex') };
  } finally {
    fs.closeSync(fd);
  }
}
