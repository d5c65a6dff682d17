import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';

import { newcArchive } from './cpio.js';

interface Parsed {
  name: string;
  mode: number;
  rdevMajor: number;
  rdevMinor: number;
  data: Buffer;
}

/** Independent reader of the newc format, for checking the writer. */
function parseNewc(buf: Buffer): Parsed[] {
  const out: Parsed[] = [];
  let off = 0;
  const align = (n: number) => (n + 3) & ~3;
  for (;;) {
    assert.equal(buf.toString('ascii', off, off + 6), '070701', `magic at ${off}`);
    const field = (i: number) => parseInt(buf.toString('ascii', off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const nameSize = field(11);
    const name = buf.toString('utf8', off + 110, off + 110 + nameSize - 1);
    assert.equal(buf[off + 110 + nameSize - 1], 0, 'name is NUL-terminated');
    const dataStart = align(off + 110 + nameSize);
    const data = buf.subarray(dataStart, dataStart + size);
    const rdev = [field(9), field(10)] as const;
    off = align(dataStart + size);
    if (name === 'TRAILER!!!') break;
    out.push({ name, mode, rdevMajor: rdev[0], rdevMinor: rdev[1], data });
  }
  assert.equal(off, buf.length, 'nothing after the trailer');
  return out;
}

const sample = newcArchive([
  { type: 'dir', path: 'bin' },
  { type: 'chardev', path: '/dev/console', major: 5, minor: 1 },
  { type: 'file', path: 'init', data: Buffer.from('#!/bin/sh\necho hi\n'), mode: 0o755 },
  { type: 'file', path: 'bin/odd', data: Buffer.from('abcde') },
  { type: 'symlink', path: 'bin/sh', target: 'busybox' },
]);

test('newc archive round-trips names, modes, devices and data', () => {
  const entries = parseNewc(sample);
  assert.deepEqual(
    entries.map((e) => [e.name, e.mode.toString(8)]),
    [
      ['bin', '40755'],
      ['dev/console', '20600'],
      ['init', '100755'],
      ['bin/odd', '100644'],
      ['bin/sh', '120777'],
    ],
  );
  assert.deepEqual([entries[1]?.rdevMajor, entries[1]?.rdevMinor], [5, 1]);
  assert.equal(entries[2]?.data.toString(), '#!/bin/sh\necho hi\n');
  assert.equal(entries[3]?.data.toString(), 'abcde');
  assert.equal(entries[4]?.data.toString(), 'busybox');
});

test('newc archive is reproducible and rejects escaping paths', () => {
  assert.deepEqual(newcArchive([{ type: 'dir', path: 'bin' }]), newcArchive([{ type: 'dir', path: 'bin' }]));
  assert.throws(() => newcArchive([{ type: 'dir', path: '../etc' }]));
  assert.throws(() => newcArchive([{ type: 'dir', path: '/' }]));
});

test('the cpio tool (when installed) reads the archive', (t) => {
  let listing: string;
  try {
    listing = execFileSync('cpio', ['-it', '--quiet'], { input: sample, encoding: 'utf8' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return t.skip('cpio not installed');
    throw err;
  }
  assert.deepEqual(listing.trim().split('\n'), ['bin', 'dev/console', 'init', 'bin/odd', 'bin/sh']);
});
