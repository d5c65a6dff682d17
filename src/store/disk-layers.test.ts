import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it, mock } from 'node:test';

import {
  assertNotInUse,
  describeDisks,
  diskBytesOf,
  printStages,
  verifyDiskChains,
} from '../cli/checkpoint.js';
import { TlcError } from '../core/errors.js';
import { identify } from '../vm/process.js';
import type { VmRecord } from '../vm/registry.js';
import { MANIFEST_FILE, type ManifestDisk, sealManifest } from './manifest.js';
import { CheckpointStore, type StoredCheckpoint } from './store.js';
import { TEST_VM_DISK, diskLayerOf, fixtureManifest, runQemuImg, writeFixtureFiles } from './testing.js';
import { verifyCheckpoint } from './verify.js';

/**
 * Checkpoints with disk layers, without QEMU: real qcow2 layers made with qemu-img, chained the way
 * incremental checkpoints chain them. Verify, the manifest schema, `show`'s disk lines, and the
 * rules that keep `rm` from breaking a chain.
 */

const MiB = 1024 * 1024;
const A = 'web-20260101-000000-aaaa';
const B = 'web-20260102-000000-bbbb';
const C = 'web-20260103-000000-cccc';
const OTHER = 'web2-20260104-000000-dddd';
const LAYER = 'disk0-0.qcow2';
const VM_DISK = TEST_VM_DISK;

let root: string;
let store: CheckpointStore;

beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-disk-layers-test-'));
  store = new CheckpointStore(path.join(root, 'checkpoints'));
});
afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

const qemuImg = runQemuImg;

const ids = (): string[] => store.list().map((c) => c.id);

/**
 * A published checkpoint `id` (VM from the id's first part) with one qcow2 disk: a full layer
 * holding some data, or, with `parent`, an incremental layer over the parent's top layer.
 */
function writeDiskCheckpoint(id: string, createdAt: string, parent?: string): ManifestDisk {
  const dir = path.join(store.dir, id);
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, LAYER);
  if (parent) {
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', `../${parent}/${LAYER}`, '-F', 'qcow2', file, '4M');
  } else {
    const raw = path.join(root, `${id}.raw`);
    fs.writeFileSync(raw, Buffer.alloc(MiB, 0x6b));
    fs.truncateSync(raw, 4 * MiB);
    qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, file);
  }
  const disk: ManifestDisk = {
    device: VM_DISK.device,
    node: VM_DISK.node,
    format: 'qcow2',
    virtualSize: 4 * MiB,
    captured: true,
    layers: [diskLayerOf(dir, LAYER, parent ? `../${parent}/${LAYER}` : undefined)],
    ...(parent ? { parent: { checkpoint: parent, file: LAYER } } : {}),
    bitmap: `tlc-${id}`,
    copiedBytes: parent ? 0 : MiB,
  };
  writeFixtureFiles(dir, {
    vm: id.split('-')[0] as string,
    id,
    createdAt,
    vmDisks: [VM_DISK],
    disks: [disk],
  });
  return disk;
}

/** A <- B <- C: B and C are incremental checkpoints of VM web, each over the one before. */
function writeChain(): void {
  writeDiskCheckpoint(A, '2026-01-01T00:00:00Z');
  writeDiskCheckpoint(B, '2026-01-02T00:00:00Z', A);
  writeDiskCheckpoint(C, '2026-01-03T00:00:00Z', B);
}

function throwsUsage(fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof TlcError, String(err));
    assert.equal(err.code, 'E_USAGE');
    assert.match(err.message, message);
    assert.ok(!err.message.includes('\n'), 'one line');
    return true;
  });
}

describe('verify checks disk layers', () => {
  beforeEach(() => void writeDiskCheckpoint(A, '2026-01-01T00:00:00Z'));
  const layer = (): string => path.join(store.dir, A, LAYER);

  it('passes intact layers and counts their bytes', () => {
    const report = verifyCheckpoint(store.resolve(A), true);
    assert.deepEqual(report.problems, []);
    assert.ok(report.bytesChecked >= fs.statSync(layer()).size);
  });

  it('full: names a layer with one changed byte; quick does not read it', () => {
    const fd = fs.openSync(layer(), 'r+');
    const at = fs.statSync(layer()).size - 100;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    fs.writeSync(fd, Buffer.from([byte[0]! ^ 0xff]), 0, 1, at);
    fs.closeSync(fd);
    assert.deepEqual(verifyCheckpoint(store.resolve(A), true).problems, [
      `${LAYER} (disk tlc-vd0): checksum mismatch`,
    ]);
    assert.deepEqual(verifyCheckpoint(store.resolve(A), false).problems, []);
  });

  it('quick: names a layer of the wrong size', () => {
    const size = fs.statSync(layer()).size;
    fs.truncateSync(layer(), size + 512);
    assert.deepEqual(verifyCheckpoint(store.resolve(A), false).problems, [
      `${LAYER} (disk tlc-vd0): ${size + 512} bytes, expected ${size}`,
    ]);
  });

  it('names a missing layer and a symlinked one', () => {
    const outside = path.join(root, 'outside.qcow2');
    fs.renameSync(layer(), outside);
    assert.match(verifyCheckpoint(store.resolve(A), false).problems.join('\n'), /disk0-0\.qcow2.*: missing/);
    fs.symlinkSync(outside, layer());
    assert.match(
      verifyCheckpoint(store.resolve(A), true).problems.join('\n'),
      /disk0-0\.qcow2 \(disk tlc-vd0\): not a regular file \(a symlink\)/,
    );
  });
});

describe('the manifest schema refuses hostile disk entries', () => {
  beforeEach(() => void writeDiskCheckpoint(A, '2026-01-01T00:00:00Z'));

  function rewritten(edit: (d: ManifestDisk) => ManifestDisk): void {
    const c = store.resolve(A);
    const m = { ...c.manifest, disks: c.manifest.disks?.map(edit) };
    fs.writeFileSync(path.join(c.dir, MANIFEST_FILE), sealManifest(m));
  }
  const refused = (message: RegExp): void =>
    assert.throws(
      () => store.resolve(A),
      (err: unknown) => {
        assert.ok(err instanceof TlcError);
        assert.equal(err.code, 'E_CORRUPT');
        assert.match(err.message, message);
        return true;
      },
    );

  it('a traversal layer name', () => {
    rewritten((d) => ({ ...d, layers: d.layers.map((l) => ({ ...l, file: '../x.qcow2' })) }));
    refused(/field disks\[0\]\.layers\[0\]\.file: must be a tlc disk layer name/);
    assert.deepEqual(ids(), [], 'not listed either');
  });

  it('a traversal parent layer name', () => {
    rewritten((d) => ({ ...d, parent: { checkpoint: B, file: '../../etc/x.qcow2' } }));
    refused(/field disks\[0\]\.parent\.file: must be a tlc disk layer name/);
  });

  it('a bitmap name not starting with tlc-', () => {
    rewritten((d) => ({ ...d, bitmap: 'backup-nightly' }));
    refused(/field disks\[0\]\.bitmap: must be a tlc bitmap name/);
  });
});

describe('disk chains', () => {
  beforeEach(writeChain);

  it('follows a chain through its parents', () => {
    const [chain] = store.diskChains(store.resolve(C));
    const sizes = [A, B, C].map((id) => fs.statSync(path.join(store.dir, id, LAYER)).size);
    assert.ok(chain);
    assert.deepEqual(chain.checkpoints, [C, B, A]);
    assert.equal(chain.incremental, true);
    assert.equal(chain.storedBytes, sizes[2]);
    assert.equal(
      chain.chainBytes,
      sizes.reduce((n, s) => n + s, 0),
    );
    assert.equal(chain.broken, undefined);
    const [full] = store.diskChains(store.resolve(A));
    assert.deepEqual(full?.checkpoints, [A]);
    assert.equal(full?.incremental, false);
    assert.equal(store.diskChains(store.resolve(A)).length, 1);
  });

  it('says where a chain is broken', () => {
    fs.rmSync(path.join(store.dir, A), { recursive: true });
    const [chain] = store.diskChains(store.resolve(C));
    assert.deepEqual(chain?.checkpoints, [C, B]);
    assert.deepEqual(chain?.broken, { checkpoint: A, reason: 'missing' });
    fs.writeFileSync(path.join(store.dir, B, MANIFEST_FILE), '{ damaged');
    assert.match(store.diskChains(store.resolve(C))[0]?.broken?.reason ?? '', /^damaged: /);
  });

  it('show: device, format, size, bytes here and in the chain, full or incremental; a missing parent', () => {
    const c = store.resolve(C);
    const [line] = describeDisks(c, store.diskChains(c));
    assert.match(
      line ?? '',
      new RegExp(
        `^  disk tlc-vd0 +qcow2, 4\\.0 MiB virtual: incremental over ${B}, .* stored here, .* in its chain of 3 checkpoints$`,
      ),
    );
    const a = store.resolve(A);
    assert.match(
      describeDisks(a, store.diskChains(a)).join('\n'),
      /qcow2, 4\.0 MiB virtual: full copy, .* stored here/,
    );
    fs.rmSync(path.join(store.dir, A), { recursive: true });
    assert.match(
      describeDisks(c, store.diskChains(c))[0] ?? '',
      new RegExp(`stored here, at least .* in its chain \\(parent ${A} missing: NOT RESTORABLE\\)$`),
    );
    const b = store.resolve(B);
    assert.match(
      describeDisks(b, store.diskChains(b)).join('\n'),
      new RegExp(`stored here \\(parent ${A} missing: NOT RESTORABLE\\)$`),
    );
  });

  it('show: a disk not captured, loudly, with why', () => {
    const c = store.resolve(C);
    const disks = c.manifest.disks?.map((d) => ({
      ...d,
      captured: false,
      reason: 'not managed by tlc; allowed inconsistent',
      layers: [],
    }));
    const m = { ...c.manifest, ...(disks ? { disks } : {}) };
    const lines = describeDisks({ ...c, manifest: m }, store.diskChains({ ...c, manifest: m }));
    assert.deepEqual(lines, [
      '  disk tlc-vd0        qcow2, 4.0 MiB virtual: NOT CAPTURED: not managed by tlc; allowed inconsistent',
    ]);
    assert.equal(diskBytesOf(m), undefined, 'ls shows -');
    const { disks: _none, ...old } = c.manifest;
    assert.match(
      describeDisks({ ...c, manifest: old }, []).join('\n'),
      /disk tlc-vd0 +qcow2: NOT CAPTURED: the checkpoint was taken before tlc saved disks/,
    );
  });

  it('ls: the bytes a checkpoint stores for its disks', () => {
    const c = store.resolve(C);
    assert.equal(diskBytesOf(c.manifest), fs.statSync(path.join(c.dir, LAYER)).size);
    assert.equal(diskBytesOf(fixtureManifest()), undefined);
  });

  it('verify: a missing parent or a damaged parent layer makes the checkpoint fail', () => {
    const check = (id: string): ReturnType<typeof verifyDiskChains> => {
      const c = store.resolve(id);
      return verifyDiskChains(store, store.diskChains(c), verifyCheckpoint(c, true), (p: StoredCheckpoint) =>
        verifyCheckpoint(p, true),
      );
    };
    const intact = check(C);
    assert.deepEqual(intact.problems, []);
    assert.ok(
      intact.bytesChecked > verifyCheckpoint(store.resolve(C), true).bytesChecked,
      'parents checked too',
    );
    fs.appendFileSync(path.join(store.dir, A, LAYER), 'x');
    const damaged = check(C);
    assert.equal(damaged.ok, false);
    assert.deepEqual(damaged.problems, [
      `disk tlc-vd0: parent ${A}: ${LAYER} (disk tlc-vd0): ${fs.statSync(path.join(store.dir, A, LAYER)).size} bytes, expected ${fs.statSync(path.join(store.dir, A, LAYER)).size - 1}`,
    ]);
    fs.rmSync(path.join(store.dir, A), { recursive: true });
    assert.deepEqual(check(B).problems, [
      `disk tlc-vd0: builds on checkpoint ${A}, which is missing: not restorable`,
    ]);
  });
});

describe('rm never breaks a chain', () => {
  beforeEach(writeChain);

  it('dependents: the checkpoints that build directly on one', () => {
    assert.deepEqual(store.dependents(A), [B]);
    assert.deepEqual(store.dependents(B), [C]);
    assert.deepEqual(store.dependents(C), []);
    assert.deepEqual(store.dependents('web-nope'), []);
    assert.deepEqual(store.ancestors(C), [C, B, A]);
    assert.deepEqual(store.ancestors(A), [A]);
  });

  it('refuses a checkpoint others build on, naming them, and removes nothing', () => {
    throwsUsage(
      () => store.remove(A),
      new RegExp(
        `^Cannot remove ${A}: checkpoint ${B} builds on its disk layers; remove it first, or use tlc rm --all web$`,
      ),
    );
    throwsUsage(() => store.removeIds([A, B]), new RegExp(`checkpoint ${C} builds on its disk layers`));
    throwsUsage(() => store.removeIds([C, A]), new RegExp(`Cannot remove ${A}: checkpoint ${B} builds`));
    assert.deepEqual(ids(), [A, B, C]);
  });

  it('removes the newest, then a whole chain given in any order, dependents first', () => {
    assert.deepEqual(store.remove(C).id, C);
    assert.deepEqual(store.dependents(B), []);
    writeDiskCheckpoint(C, '2026-01-03T00:00:00Z', B);
    const renamed = mock.method(fs, 'renameSync');
    try {
      assert.deepEqual(
        store.removeIds([A, C, B]).map((c) => c.id),
        [A, C, B],
        'reported in the order given',
      );
      assert.deepEqual(
        renamed.mock.calls.map((call) => path.basename(String(call.arguments[0]))),
        [C, B, A],
        'removed dependents first',
      );
    } finally {
      renamed.mock.restore();
    }
    assert.deepEqual(ids(), []);
  });

  it('--all removes every checkpoint of the VM, newest first', () => {
    writeFixtureFiles(path.join(store.dir, OTHER), {
      vm: 'web2',
      id: OTHER,
      createdAt: '2026-01-04T00:00:00Z',
    });
    const renamed = mock.method(fs, 'renameSync');
    try {
      assert.deepEqual(
        store.removeAllOf('web').map((c) => c.id),
        [A, B, C],
      );
      assert.deepEqual(
        renamed.mock.calls.map((call) => path.basename(String(call.arguments[0]))),
        [C, B, A],
      );
    } finally {
      renamed.mock.restore();
    }
    assert.deepEqual(ids(), [OTHER]);
  });

  it("--all refuses when another VM's checkpoint builds on one of them", () => {
    writeDiskCheckpoint(OTHER, '2026-01-04T00:00:00Z', C);
    throwsUsage(
      () => store.removeAllOf('web'),
      new RegExp(`^Cannot remove ${C}: checkpoint ${OTHER} builds on its disk layers; remove it first$`),
    );
    assert.deepEqual(ids(), [A, B, C, OTHER]);
  });

  it('removes a damaged checkpoint only when nothing builds on it', () => {
    fs.writeFileSync(path.join(store.dir, B, MANIFEST_FILE), '{ damaged');
    throwsUsage(
      () => store.remove(B),
      new RegExp(`^Cannot remove ${B}: checkpoint ${C} builds .*; remove it first$`),
    );
    store.removeIds([B, C]);
    assert.deepEqual(ids(), [A]);
  });
});

describe('rm refuses checkpoints a running VM runs on', () => {
  beforeEach(writeChain);

  /** A VM record restored from `from`, running (this test's own process) or not. */
  function record(name: string, from: string | undefined, running: boolean, disks = true): VmRecord {
    const self = identify(process.pid);
    assert.ok(self);
    return {
      spec: {
        ...fixtureManifest().vm,
        name,
        ...(disks ? { disks: [{ ...VM_DISK, path: `/var/lib/tlc/vms/${name}/overlay.qcow2` }] } : {}),
      },
      paths: {
        qmpSocket: '/nonexistent/qmp.sock',
        consoleLog: '/nonexistent/console.log',
        pidFile: '/nonexistent/pid',
      },
      process: running ? self : { pid: self.pid, startTicks: self.startTicks + 1 },
      startedAt: '2026-01-05T00:00:00Z',
      adopted: false,
      ...(from ? { restoredFrom: from } : {}),
    };
  }

  it('refuses the checkpoint a running VM was restored from, and every one it builds on, naming the VM', () => {
    const vms = [record('db', C, true)];
    throwsUsage(
      () => assertNotInUse(store, [C], vms),
      new RegExp(
        `^Cannot remove ${C}: running VM db's disks are backed by its layers; stop the VM first \\(tlc vm stop db\\)$`,
      ),
    );
    throwsUsage(
      () => assertNotInUse(store, [A], vms),
      new RegExp(
        `^Cannot remove ${A}: running VM db's disks are backed by its layers \\(restored from ${C}, which builds on it\\)`,
      ),
    );
    throwsUsage(() => assertNotInUse(store, [A, B, C], vms), /running VM db/);
  });

  it('allows it when the VM is stopped, has no disks, or runs on another chain', () => {
    assertNotInUse(store, [A, B, C], [record('db', C, false)]);
    assertNotInUse(store, [A, B, C], [record('db', C, true, false)]);
    assertNotInUse(store, [A, B, C], [record('db', undefined, true)]);
    writeDiskCheckpoint(OTHER, '2026-01-04T00:00:00Z');
    assertNotInUse(store, [A, B, C], [record('db', OTHER, true)]);
    assertNotInUse(store, [C], [record('db', B, true)]);
  });
});

describe('printStages', () => {
  it('prints the disk step when the checkpoint has one', () => {
    const m = fixtureManifest();
    const lines: string[] = [];
    printStages(
      { ...m, metrics: { ...m.metrics, disk: { pauseMs: 2.5, copiedBytes: 1.3 * MiB, copyMs: 300 } } },
      (l) => lines.push(l),
    );
    assert.ok(
      lines.includes('  disk step           pause 2.5 ms (the VM stopped for it), 1.3 MiB copied in 300 ms'),
    );
    const without: string[] = [];
    printStages(m, (l) => without.push(l));
    assert.ok(!without.some((l) => l.includes('disk step')));
  });
});
