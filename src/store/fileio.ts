import fs from 'node:fs';
import { PersistError } from '../core/errors.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';

/** Positioned I/O that finishes short reads and writes and names the file on failure. */
export function openNew(file: string): number {
  try {
    return fs.openSync(file, 'wx', PRIVATE_FILE_MODE);
  } catch (err) {
    throw new PersistError('create', file, err);
  }
}

export function writeFull(fd: number, buf: Buffer, len: number, position: number, file: string): void {
  let done = 0;
  try {
    while (done < len) done += fs.writeSync(fd, buf, done, len - done, position + done);
  } catch (err) {
    throw new PersistError('write', file, err);
  }
}

/** Reads exactly `len` bytes (a sparse file's holes and the end of a file read as zeros). */
export function readFull(fd: number, buf: Buffer, len: number, position: number, file: string): void {
  let done = 0;
  try {
    while (done < len) {
      const n = fs.readSync(fd, buf, done, len - done, position + done);
      if (n === 0) {
        buf.fill(0, done, len);
        return;
      }
      done += n;
    }
  } catch (err) {
    throw new PersistError('read', file, err);
  }
}

export function writeDurable(file: string, data: Uint8Array): void {
  const fd = openNew(file);
  try {
    fs.writeFileSync(fd, data);
    fs.fdatasyncSync(fd);
  } catch (err) {
    throw new PersistError('write', file, err);
  } finally {
    fs.closeSync(fd);
  }
}

export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}
