import assert from 'node:assert/strict';
import path from 'node:path';
import { describe, it } from 'node:test';
import {
  Layout,
  blockDir,
  blockFromDir,
  checkBlock,
  checkName,
  decodeObject,
  encodeObjectHead,
} from './layout.js';

describe('data directory layout', () => {
  it('refuses ids and names that could leave the data directory', () => {
    for (const bad of [
      '../../etc',
      '..',
      '.',
      '.hidden',
      'a/b',
      '/abs',
      '',
      'a\0b',
      'x'.repeat(129),
      7,
      null,
    ])
      assert.throws(() => checkName(bad, 'checkpoint id'), /invalid checkpoint id/);
    assert.equal(checkName('vm1-20261123-223000-ab12', 'checkpoint id'), 'vm1-20261123-223000-ab12');
    const layout = new Layout('/srv/ms');
    assert.equal(layout.pendingDir('c1'), path.join('/srv/ms', 'pending', 'c1'));
    assert.throws(() => layout.committedDir('../committed'), /invalid/);
    assert.throws(() => layout.inside('/srv/other'), /escapes/);
    assert.throws(() => layout.inside('/srv/ms'), /escapes/);
  });

  it('encodes block names (which contain slashes) as one safe path component, reversibly', () => {
    for (const block of [
      'pc.ram',
      '/rom@etc/acpi/tables',
      '0000:00:02.0/vga.vram',
      '..',
      '%41',
      'a b'.replace(' ', '_'),
    ]) {
      checkBlock(block);
      const dir = blockDir(block);
      assert.ok(dir.startsWith('b-') && !dir.includes('/'), dir);
      assert.equal(blockFromDir(dir), block);
    }
    assert.throws(() => checkBlock('a\\b'), /invalid block name/);
    assert.throws(() => checkBlock('with space'), /invalid block name/);
    assert.throws(() => checkBlock(''), /invalid block name/);
  });

  it('stores the checksum beside the data and reports damaged files', () => {
    const data = Buffer.from('hello');
    const sum = Buffer.alloc(32, 9);
    const file = Buffer.concat([encodeObjectHead(4096, data.length, sum), data]);
    const o = decodeObject(file, 'f');
    assert.equal(o.offset, 4096);
    assert.ok(o.sha256.equals(sum));
    assert.equal(o.data.toString(), 'hello');
    assert.throws(() => decodeObject(file.subarray(0, file.length - 1), 'f'), /header says 5/);
    assert.throws(() => decodeObject(Buffer.alloc(60), 'f'), /bad magic/);
  });
});
