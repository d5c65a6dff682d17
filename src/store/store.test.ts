import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';

import { MANIFEST_FILE, sealManifest } from './manifest.js';
import { CheckpointStore } from './store.js';
import { writeFixtureCheckpoint, writeFixtureFiles } from './testing.js';
import { verifyCheckpoint } from './verify.js';

let root: string;
let store: CheckpointStore;

beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-store-test-'));
  store = new CheckpointStore(path.join(root, 'checkpoints'));
});
afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

const ids = (): string[] => store.list().map((c) => c.id);

/** A pid that belonged to a process that has exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
  return Number(child.stdout.toString());
}

/** Two checkpoints of VM `web`, one of VM `web2`, oldest first. */
function webFixtures(): void {
  writeFixtureCheckpoint(store.dir, {
    vm: 'web',
    id: 'web-20260101-000000-aaaa',
    createdAt: '2026-01-01T00:00:00Z',
  });
  writeFixtureCheckpoint(store.dir, {
    vm: 'web',
    id: 'web-20260102-000000-bbbb',
    createdAt: '2026-01-02T00:00:00Z',
  });
  writeFixtureCheckpoint(store.dir, {
    vm: 'web2',
    id: 'web2-20260103-000000-cccc',
    createdAt: '2026-01-03T00:00:00Z',
  });
}

describe('stage, publish, discard', () => {
  it('publishes a staged checkpoint by rename; listing never shows staging', () => {
    const id = store.newId('web');
    assert.match(id, /^web-\d{8}-\d{6}-[0-9a-f]{4}$/);
    const staging = store.stage(id);
    assert.equal(path.basename(staging), `.tmp-${id}-${process.pid}`);
    assert.equal(fs.statSync(staging).mode & 0o777, 0o700);
    assert.equal(fs.statSync(store.dir).mode & 0o777, 0o700);
    const m = writeFixtureFiles(staging, { id });
    assert.deepEqual(ids(), [], 'staging is not listed');
    const final = store.publish(staging, id);
    assert.equal(final, path.join(store.dir, id));
    assert.ok(!fs.existsSync(staging));
    assert.deepEqual(ids(), [id]);
    assert.equal(store.resolve(id).manifest.createdAt, m.createdAt);
    assert.ok(verifyCheckpoint(store.resolve(id), true).ok);
  });

  it('discards a staging directory with everything in it', () => {
    const staging = store.stage('web-x');
    fs.writeFileSync(path.join(staging, 'block-0.img'), 'partial');
    store.discard(staging);
    assert.ok(!fs.existsSync(staging));
    assert.deepEqual(fs.readdirSync(store.dir), []);
  });

  it("sweeps a dead run's staging directory, never a live one's", () => {
    fs.mkdirSync(store.dir, { recursive: true });
    const dead = path.join(store.dir, `.tmp-web-20260101-000000-aaaa-${deadPid()}`);
    const deadRm = path.join(store.dir, `.tmp-rm-web-20260101-000000-bbbb-${deadPid()}`);
    const live = path.join(store.dir, `.tmp-web-20260101-000000-cccc-${process.pid}`);
    for (const d of [dead, deadRm, live]) {
      fs.mkdirSync(d);
      fs.writeFileSync(path.join(d, 'block-0.img'), 'x');
    }
    const staging = store.stage('web-20260101-000000-dddd');
    assert.ok(!fs.existsSync(dead), 'dead run swept');
    assert.ok(!fs.existsSync(deadRm), 'interrupted rm swept');
    assert.ok(fs.existsSync(live), 'live run kept');
    assert.ok(fs.existsSync(staging));
  });
});

describe('list', () => {
  it('hides damaged manifests and a manifest that names another directory', () => {
    webFixtures();
    const damaged = path.join(store.dir, 'web-20260101-000000-aaaa', MANIFEST_FILE);
    fs.writeFileSync(damaged, fs.readFileSync(damaged, 'utf8').replace('"cpus": 2', '"cpus": 3'));
    fs.mkdirSync(path.join(store.dir, 'web-copy'));
    fs.copyFileSync(
      path.join(store.dir, 'web-20260102-000000-bbbb', MANIFEST_FILE),
      path.join(store.dir, 'web-copy', MANIFEST_FILE),
    );
    fs.mkdirSync(path.join(store.dir, 'not-a-checkpoint'));
    assert.deepEqual(ids(), ['web-20260102-000000-bbbb', 'web2-20260103-000000-cccc']);
    assert.throws(() => store.resolve('web-20260101-000000-aaaa'), {
      code: 'E_CORRUPT',
      message: /manifest checksum mismatch/,
    });
    assert.throws(() => store.resolve('web-copy'), {
      code: 'E_CORRUPT',
      message: /manifest is for checkpoint "web-20260102-000000-bbbb", not "web-copy"/,
    });
  });

  it('refuses a manifest that is not a regular file', () => {
    fs.mkdirSync(path.join(store.dir, 'web-fifo'), { recursive: true });
    spawnSync('mkfifo', [path.join(store.dir, 'web-fifo', MANIFEST_FILE)]);
    assert.throws(() => store.resolve('web-fifo'), { code: 'E_CORRUPT', message: /not a regular file/ });
    assert.deepEqual(ids(), []);
  });

  it('lists an empty or missing store as empty', () => {
    assert.deepEqual(ids(), []);
  });
});

describe('resolve', () => {
  beforeEach(webFixtures);

  it('finds an exact id', () => {
    assert.equal(store.resolve('web-20260101-000000-aaaa').id, 'web-20260101-000000-aaaa');
  });

  it("finds a VM name's newest checkpoint", () => {
    assert.equal(store.resolve('web').id, 'web-20260102-000000-bbbb');
    assert.equal(store.resolve('web2').id, 'web2-20260103-000000-cccc');
  });

  it('finds a unique id prefix that starts with its VM name', () => {
    assert.equal(store.resolve('web-20260101').id, 'web-20260101-000000-aaaa');
    assert.equal(store.resolve('web2-2026').id, 'web2-20260103-000000-cccc');
  });

  it('never matches a prefix across VM names: web is not web2', () => {
    store.removeAllOf('web');
    assert.throws(() => store.resolve('web'), { code: 'E_NOT_FOUND', message: /No checkpoint "web"/ });
    assert.throws(() => store.resolve('we'), { code: 'E_NOT_FOUND' });
    assert.throws(() => store.resolve('web-2026'), { code: 'E_NOT_FOUND' });
    assert.equal(store.resolve('web2').id, 'web2-20260103-000000-cccc');
  });

  it('refuses an empty or an ambiguous reference', () => {
    assert.throws(() => store.resolve(''), { code: 'E_USAGE', message: /Empty checkpoint reference/ });
    assert.throws(() => store.resolve('web-2026'), {
      code: 'E_USAGE',
      message: /"web-2026" matches 2 checkpoints; give more of the id/,
    });
  });

  it('does not look outside the store', () => {
    for (const ref of ['..', '.', '../checkpoints/web-20260101-000000-aaaa', '/etc', '.tmp-x']) {
      assert.throws(() => store.resolve(ref), { code: 'E_NOT_FOUND' }, ref);
    }
  });
});

describe('rm', () => {
  beforeEach(webFixtures);

  it('removes exactly the id given', () => {
    assert.deepEqual(
      store.removeIds(['web-20260101-000000-aaaa']).map((c) => c.id),
      ['web-20260101-000000-aaaa'],
    );
    assert.deepEqual(ids(), ['web-20260102-000000-bbbb', 'web2-20260103-000000-cccc']);
    assert.deepEqual(
      fs.readdirSync(store.dir).filter((e) => e.startsWith('.')),
      [],
      'nothing left behind',
    );
  });

  it('takes neither a VM name nor a prefix, and says what to do instead', () => {
    assert.throws(() => store.remove('web'), {
      code: 'E_NOT_FOUND',
      message: /"web" is a VM with 2 checkpoints: tlc rm --all web removes them/,
    });
    assert.throws(() => store.remove('web-20260101'), {
      code: 'E_NOT_FOUND',
      message: /No checkpoint with id "web-20260101".*rm takes exact ids/,
    });
    assert.throws(() => store.remove(''), { code: 'E_USAGE' });
    assert.throws(() => store.remove('..'), { code: 'E_NOT_FOUND' });
    assert.equal(ids().length, 3);
  });

  it('removes nothing when one of several ids is wrong', () => {
    assert.throws(() => store.removeIds(['web-20260101-000000-aaaa', 'web-nope']), { code: 'E_NOT_FOUND' });
    assert.equal(ids().length, 3);
  });

  it('removes a checkpoint whose manifest is damaged', () => {
    const file = path.join(store.dir, 'web-20260101-000000-aaaa', MANIFEST_FILE);
    fs.writeFileSync(file, '{ damaged');
    store.remove('web-20260101-000000-aaaa');
    assert.ok(!fs.existsSync(path.dirname(file)));
  });

  it('--all removes every checkpoint of one VM and no other', () => {
    assert.deepEqual(
      store.removeAllOf('web').map((c) => c.id),
      ['web-20260101-000000-aaaa', 'web-20260102-000000-bbbb'],
    );
    assert.deepEqual(ids(), ['web2-20260103-000000-cccc']);
    assert.throws(() => store.removeAllOf('web'), {
      code: 'E_NOT_FOUND',
      message: /No checkpoints of VM "web"/,
    });
    assert.throws(() => store.removeAllOf(''), { code: 'E_USAGE' });
  });
});

describe('verify', () => {
  beforeEach(webFixtures);

  it('passes an intact checkpoint', () => {
    const report = verifyCheckpoint(store.resolve('web2'), true);
    assert.deepEqual(report.problems, []);
    assert.ok(report.bytesChecked > 1024 * 1024);
  });

  it('names a damaged chunk, a wrong size, a missing file', () => {
    const dir = store.resolve('web2').dir;
    const image = path.join(dir, 'block-0.img');
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 4096 * 3);
    fs.closeSync(fd);
    fs.truncateSync(path.join(dir, 'block-1.img'), 4096);
    fs.rmSync(path.join(dir, 'device.bin'));
    const problems = verifyCheckpoint(store.resolve('web2'), true).problems.join('\n');
    assert.match(problems, /block-0\.img \(ram0\): bytes 0-1048575 do not match their checksum/);
    assert.match(problems, /block-1\.img \(\/rom@etc\/acpi\/tables\): 4096 bytes, expected 131072/);
    assert.match(problems, /device\.bin: missing/);
  });

  it('refuses a symlinked file even when its content matches', () => {
    const dir = store.resolve('web2').dir;
    const outside = path.join(root, 'outside.img');
    fs.renameSync(path.join(dir, 'block-0.img'), outside);
    fs.symlinkSync(outside, path.join(dir, 'block-0.img'));
    assert.match(
      verifyCheckpoint(store.resolve('web2'), true).problems.join('\n'),
      /block-0\.img \(ram0\): not a regular file \(a symlink\)/,
    );
  });

  it('refuses a traversal name in a manifest built in code (not through openManifest)', () => {
    const c = store.resolve('web2');
    const m = { ...c.manifest, device: { ...c.manifest.device, file: '../../outside' } };
    assert.match(
      verifyCheckpoint({ ...c, manifest: m }, false).problems.join('\n'),
      /"\.\.\/\.\.\/outside" is not a tlc checkpoint file name/,
    );
  });

  it('refuses a traversal name in a manifest on disk at validation', () => {
    const c = store.resolve('web2');
    const m = {
      ...c.manifest,
      blocks: c.manifest.blocks.map((b) => ({ ...b, file: '../../../etc/passwd' })),
    };
    fs.writeFileSync(path.join(c.dir, MANIFEST_FILE), sealManifest(m));
    assert.throws(() => store.resolve(c.id), {
      code: 'E_CORRUPT',
      message: /field blocks\[0\]\.file: must be a tlc image file name/,
    });
  });
});
