import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';

import { TlcError } from '../core/errors.js';
import type { ManifestDisk } from '../store/manifest.js';
import { CheckpointStore, type StoredCheckpoint } from '../store/store.js';
import { TEST_VM_DISK, diskLayerOf, runQemuImg, writeFixtureFiles } from '../store/testing.js';
import { qcow2Backing, restoreDisks } from './restore-disks.js';

/**
 * The disk half of a restore, without QEMU: real qcow2 layers made with qemu-img in a store built
 * by hand, the way a checkpoint and an incremental checkpoint over it lay them out.
 */

const MiB = 1024 * 1024;
const PARENT = 'web-20260101-000000-aaaa';
const CHILD = 'web-20260102-000000-bbbb';
const LAYER = 'disk0-0.qcow2';
const VM_DISK = TEST_VM_DISK;

let root: string;
let store: CheckpointStore;

beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-restore-disks-test-'));
  store = new CheckpointStore(path.join(root, 'checkpoints'));
});
afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

const qemuImg = runQemuImg;

function rejectsCorrupt(message: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof TlcError, String(err));
    assert.equal(err.code, 'E_CORRUPT');
    assert.match(err.message, message);
    return true;
  };
}

describe('qcow2Backing', () => {
  it('reads no backing name from a standalone image', () => {
    const file = path.join(root, 'plain.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, '1M');
    assert.equal(qcow2Backing(file), undefined);
  });

  it('reads a relative backing name exactly as written in the header', () => {
    const file = path.join(root, 'over.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', `../${PARENT}/${LAYER}`, '-F', 'qcow2', file, '1M');
    assert.equal(qcow2Backing(file), `../${PARENT}/${LAYER}`);
  });

  it('refuses a raw file', () => {
    const file = path.join(root, 'disk.raw');
    fs.writeFileSync(file, Buffer.alloc(64 * 1024, 0x5a));
    assert.throws(() => qcow2Backing(file), rejectsCorrupt(/disk\.raw is not a qcow2 image/));
  });

  it('refuses a qcow2 image that keeps its data in an external file', () => {
    const file = path.join(root, 'external.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(root, 'external.data')}`, file, '1M');
    assert.throws(
      () => qcow2Backing(file),
      rejectsCorrupt(/external\.qcow2 keeps its data in an external file/),
    );
  });
});

describe('restoreDisks', () => {
  let data: string;
  let parentDir: string;
  let childDir: string;

  function manifestDisk(dir: string, parent?: string): ManifestDisk {
    return {
      device: VM_DISK.device,
      node: VM_DISK.node,
      format: 'qcow2',
      virtualSize: 2 * MiB,
      captured: true,
      layers: [diskLayerOf(dir, LAYER, parent ? `../${parent}/${LAYER}` : undefined)],
      ...(parent ? { parent: { checkpoint: parent, file: LAYER } } : {}),
      bitmap: `tlc-${path.basename(dir)}`,
      copiedBytes: 2 * MiB,
    };
  }

  /** Writes (or rewrites) a checkpoint's manifest describing its layer files as they are now. */
  function seal(dir: string, parent?: string): void {
    const id = path.basename(dir);
    writeFixtureFiles(dir, {
      id,
      createdAt: id === PARENT ? '2026-01-01T00:00:00Z' : '2026-01-02T00:00:00Z',
      vmDisks: [VM_DISK],
      disks: [manifestDisk(dir, parent)],
    });
  }

  beforeEach(() => {
    // The guest's disk: a pattern in its first MiB, zeros after. The parent checkpoint holds a
    // full copy of it; the child an (empty) incremental layer over the parent's.
    data = path.join(root, 'guest.raw');
    const content = Buffer.alloc(2 * MiB);
    for (let i = 0; i < MiB; i += 512) content.write(`sector ${i / 512}`, i);
    fs.writeFileSync(data, content);
    parentDir = path.join(store.dir, PARENT);
    childDir = path.join(store.dir, CHILD);
    fs.mkdirSync(parentDir, { recursive: true });
    fs.mkdirSync(childDir, { recursive: true });
    qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', data, path.join(parentDir, LAYER));
    qemuImg(
      'create',
      '-q',
      '-f',
      'qcow2',
      '-u',
      '-b',
      `../${PARENT}/${LAYER}`,
      '-F',
      'qcow2',
      path.join(childDir, LAYER),
      '2M',
    );
    seal(parentDir);
    seal(childDir, PARENT);
  });

  const restore = (ckpt: StoredCheckpoint, parents: string[] = [], log: string[] = []) =>
    restoreDisks({
      ckpt,
      store,
      targetDir: path.join(root, 'vm'),
      vmName: 'web-r',
      log: (line) => log.push(line),
      verifyParent: (p) => void parents.push(p.id),
    });

  it("creates a new overlay backed by the child's top layer, with the disk's content through the chain", async () => {
    const parents: string[] = [];
    const log: string[] = [];
    const [restored, ...more] = await restore(store.resolve(CHILD), parents, log);
    assert.equal(more.length, 0);
    assert.ok(restored);
    const top = path.join(childDir, LAYER);
    assert.equal(restored.backedBy, top);
    assert.equal(path.dirname(restored.disk.path), path.join(root, 'vm'));
    assert.deepEqual(
      { ...restored.disk, path: '' },
      { path: '', format: 'qcow2', node: VM_DISK.node, device: VM_DISK.device },
    );
    assert.equal(fs.statSync(restored.disk.path).mode & 0o777, 0o600);
    const info = JSON.parse(qemuImg('info', '--output=json', restored.disk.path)) as Record<string, unknown>;
    assert.equal(info['backing-filename'], top);
    assert.equal(info['virtual-size'], 2 * MiB);
    assert.deepEqual(parents, [PARENT], 'the parent checkpoint is verified');
    assert.match(log.join('\n'), new RegExp(`disk tlc-vd0: .*new overlay over ${CHILD}/${LAYER}`));
    // Exactly the guest's disk, read through overlay, child layer and parent layer.
    qemuImg('compare', '-q', '-f', 'qcow2', '-F', 'raw', restored.disk.path, data);
    // The checkpoint's layers are untouched.
    assert.equal(
      store.resolve(CHILD).manifest.disks?.[0]?.layers[0]?.sha256,
      manifestDisk(childDir, PARENT).layers[0]?.sha256,
    );
  });

  it('restores the full parent checkpoint on its own', async () => {
    const parents: string[] = [];
    const [restored] = await restore(store.resolve(PARENT), parents);
    assert.equal(restored?.backedBy, path.join(parentDir, LAYER));
    assert.deepEqual(parents, []);
    qemuImg('compare', '-q', '-f', 'qcow2', '-F', 'raw', restored?.disk.path as string, data);
  });

  it('refuses a child layer whose header names another file, naming the layer', async () => {
    qemuImg('rebase', '-u', '-b', '/etc/passwd', '-F', 'raw', path.join(childDir, LAYER));
    await assert.rejects(
      restore(store.resolve(CHILD)),
      rejectsCorrupt(
        new RegExp(
          `${CHILD}: disk layer ${LAYER} names backing file "/etc/passwd", expected "\\.\\./${PARENT}/${LAYER}"`,
        ),
      ),
    );
    assert.ok(!fs.existsSync(path.join(root, 'vm')) || fs.readdirSync(path.join(root, 'vm')).length === 0);
  });

  it("refuses a parent's full layer that has grown a backing file, naming the parent's layer", async () => {
    qemuImg('rebase', '-u', '-b', '/etc/passwd', '-F', 'raw', path.join(parentDir, LAYER));
    await assert.rejects(
      restore(store.resolve(CHILD)),
      rejectsCorrupt(
        new RegExp(`${PARENT}: disk layer ${LAYER} names backing file "/etc/passwd", expected "\\(none\\)"`),
      ),
    );
  });

  it('refuses a manifest whose backing name does not match the header', async () => {
    const c = store.resolve(CHILD);
    const disks = c.manifest.disks?.map((d) => ({
      ...d,
      layers: d.layers.map((l) => ({ ...l, backing: '/etc/passwd' })),
    }));
    await assert.rejects(
      restore({ ...c, manifest: { ...c.manifest, ...(disks ? { disks } : {}) } }),
      rejectsCorrupt(new RegExp(`${CHILD}: disk layer ${LAYER}`)),
    );
  });

  it('refuses a missing parent checkpoint, naming it', async () => {
    fs.rmSync(parentDir, { recursive: true });
    await assert.rejects(
      restore(store.resolve(CHILD)),
      rejectsCorrupt(new RegExp(`${CHILD}: disk tlc-vd0 builds on checkpoint ${PARENT}, which is missing`)),
    );
  });

  it('refuses a writable disk the checkpoint did not capture', async () => {
    const c = store.resolve(CHILD);
    const disks = c.manifest.disks?.map((d) => ({
      ...d,
      captured: false,
      reason: 'allowed inconsistent',
      layers: [],
    }));
    await assert.rejects(
      restore({ ...c, manifest: { ...c.manifest, ...(disks ? { disks } : {}) } }),
      (err: unknown) => {
        assert.ok(err instanceof TlcError);
        assert.equal(err.code, 'E_RESTORE');
        assert.match(err.message, /did not capture disk tlc-vd0 \(allowed inconsistent\)/);
        return true;
      },
    );
  });
});
