import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { TlcError } from '../core/errors.js';
import {
  type Manifest,
  MANIFEST_FORMAT_MAJOR,
  MANIFEST_FORMAT_MINOR,
  checkpointFilePath,
  sealManifest,
} from './manifest.js';
import { openManifest } from './schema.js';
import { fixtureManifest } from './testing.js';

type Json = Record<string, unknown>;

/** A deep copy of the valid fixture with one field changed (or deleted when `value` is DELETE). */
const DELETE = Symbol('delete');
function mutated(field: string, value: unknown): Json {
  const m = structuredClone(fixtureManifest()) as unknown as Json;
  const parts = field.split('.').map((p) => (/^\d+$/.test(p) ? Number(p) : p));
  let at: Record<string | number, unknown> = m;
  for (const p of parts.slice(0, -1)) at = at[p] as Record<string | number, unknown>;
  const last = parts.at(-1) as string | number;
  if (value === DELETE) delete at[last];
  else at[last] = value;
  return m;
}

/** Seals (valid checksum) and opens: only the schema can refuse it. */
function open(m: Json): Manifest {
  return openManifest(sealManifest(m as unknown as Manifest), '/store/x/manifest.json');
}

function refused(m: Json | string, pattern: RegExp): void {
  assert.throws(
    () => (typeof m === 'string' ? openManifest(m, '/store/x/manifest.json') : open(m)),
    (err: unknown) => {
      assert.ok(err instanceof TlcError, `a TlcError, got ${String(err)}`);
      assert.equal(err.code, 'E_CORRUPT');
      assert.ok(!err.message.includes('\n'), `one line: ${err.message}`);
      assert.match(err.message, pattern);
      return true;
    },
  );
}

describe('manifest validation', () => {
  it('accepts the valid fixture and returns it unchanged', () => {
    const m = fixtureManifest();
    const opened = open(m as unknown as Json);
    assert.deepEqual({ ...opened, checksum: undefined }, { ...m, checksum: undefined });
  });

  // [field, bad value, expected text in the message]; each is refused naming the field.
  const cases: [string, unknown, RegExp][] = [
    ['id', DELETE, /field id: missing/],
    ['id', 5, /field id: expected string, got number/],
    ['id', '../../x', /field id: must be 1-128 letters/],
    ['id', '.tmp-web-1', /field id: must be/],
    ['id', 'web/../../x', /field id: must be/],
    ['id', 'db-20260101-120000-abcd', /field id: must start with the VM name \("web-"\)/],
    ['createdAt', 'yesterday', /field createdAt: must be an ISO 8601 UTC time/],
    ['createdAt', 1767268800000, /field createdAt: expected string, got number/],
    ['mode', 'fast', /field mode: invalid enum value/i],
    ['vm', DELETE, /field vm: missing/],
    ['vm', [], /field vm: expected object, got array/],
    ['vm.specVersion', 2, /field vm\.specVersion: invalid literal value/i],
    ['vm.name', 'web server', /field vm\.name: must be a VM name/],
    ['vm.name', '', /field vm\.name: must be a VM name/],
    ['vm.qemu', DELETE, /field vm\.qemu: missing/],
    ['vm.qemu.binary', '', /field vm\.qemu\.binary: must not be empty/],
    ['vm.qemu.binary', 7, /field vm\.qemu\.binary: expected string/],
    ['vm.qemu.version', '7.2', /field vm\.qemu\.version: must be a QEMU version/],
    ['vm.machine', 'pc,accel=kvm', /field vm\.machine: must be 1-64 letters/],
    ['vm.accel', 'hvf', /field vm\.accel: invalid enum value/i],
    ['vm.memMiB', -1, /field vm\.memMiB: number must be greater than or equal to 1/],
    ['vm.memMiB', 0, /field vm\.memMiB: number must be greater than or equal to 1/],
    ['vm.memMiB', 1.5, /field vm\.memMiB: expected integer, got float/],
    ['vm.memMiB', 2 ** 21, /field vm\.memMiB: number must be less than or equal to 1048576/],
    ['vm.memMiB', '1', /field vm\.memMiB: expected number, got string/],
    ['vm.cpus', 0, /field vm\.cpus: number must be greater than or equal to 1/],
    ['vm.memory', DELETE, /field vm\.memory: missing/],
    ['vm.memory.kind', 'shm', /field vm\.memory\.kind: invalid discriminator value/i],
    [
      'vm.memory',
      { kind: 'file', path: 'img', share: false },
      /field vm\.memory\.path: must be an absolute path/,
    ],
    ['vm.memory', { kind: 'file', path: '/img' }, /field vm\.memory\.share: missing/],
    ['vm.memory', { kind: 'memfd', path: '/x' }, /field vm\.memory: unknown field "path"/],
    ['vm.kernel', 'vmlinuz', /field vm\.kernel: must be an absolute path/],
    ['vm.kernel', '/boot/vm\u0000linuz', /field vm\.kernel: must not contain control characters/],
    ['vm.append', 'quiet\ninit=/bin/sh', /field vm\.append: must not contain control characters/],
    ['vm.extraArgs', DELETE, /field vm\.extraArgs: missing/],
    ['vm.extraArgs', '-device x', /field vm\.extraArgs: expected array, got string/],
    ['vm.extraArgs', [1], /field vm\.extraArgs\[0\]: expected string, got number/],
    ['vm.adoptedArgv', [null], /field vm\.adoptedArgv\[0\]: expected string, got null/],
    ['qemuVersion', DELETE, /field qemuVersion: missing/],
    ['qemuVersion', '7.2.0; reboot', /field qemuVersion: must be a QEMU version/],
    ['machineType', 'pc,memory-backend=x', /field machineType: must be 1-64 letters/],
    ['pageSize', 8192, /field pageSize: invalid literal value, expected 4096/i],
    ['pageSize', '4096', /field pageSize: invalid literal value/i],
    ['ramSection', DELETE, /field ramSection: missing/],
    ['ramSection.sectionId', -1, /field ramSection\.sectionId: number must be greater than or equal to 0/],
    ['ramSection.instanceId', 2 ** 32, /field ramSection\.instanceId: number must be less than or equal to/],
    ['ramSection.versionId', 1.5, /field ramSection\.versionId: expected integer/],
    ['blocks', [], /field blocks: array must contain at least 1 element/i],
    ['blocks', 'block-0.img', /field blocks: expected array, got string/],
    ['blocks.0', null, /field blocks\[0\]: expected object, got null/],
    ['blocks.0.name', '', /field blocks\[0\]\.name: must not be empty/],
    ['blocks.0.name', '\u001b[2Jram0', /field blocks\[0\]\.name: must not contain control characters/],
    ['blocks.1.name', 'ram0', /field blocks\[1\]\.name: duplicate block "ram0"/],
    [
      'blocks.0.usedLength',
      -4096,
      /field blocks\[0\]\.usedLength: number must be greater than or equal to 0/,
    ],
    [
      'blocks.0.usedLength',
      4097,
      /field blocks\[0\]\.usedLength: must be a multiple of the page size \(4096\)/,
    ],
    ['blocks.0.usedLength', 2 ** 40 + 4096, /field blocks\[0\]\.usedLength: must be at most 1 TiB/],
    ['blocks.0.usedLength', '1048576', /field blocks\[0\]\.usedLength: expected number, got string/],
    ['blocks.0.usedLength', DELETE, /field blocks\[0\]\.usedLength: missing/],
    ['blocks.0.file', '../../x', /field blocks\[0\]\.file: must be a tlc image file name/],
    [
      'blocks.0.file',
      'block-0.img/../../../etc/passwd',
      /field blocks\[0\]\.file: must be a tlc image file name/,
    ],
    ['blocks.0.file', '/etc/passwd', /field blocks\[0\]\.file: must be a tlc image file name/],
    ['blocks.0.file', 'block-00.img', /field blocks\[0\]\.file: must be a tlc image file name/],
    ['blocks.0.file', 'block-1.img', /field blocks\[0\]\.file: must be block-0\.img/],
    ['blocks.0.sumsFile', '../../x.sums', /field blocks\[0\]\.sumsFile: must be a tlc sums file name/],
    ['blocks.0.sumsFile', 'block-0.sums', /field blocks\[0\]\.sumsFile: must be a tlc sums file name/],
    ['blocks.1.sumsFile', 'block-0.img.sums', /field blocks\[1\]\.sumsFile: must be block-1\.img\.sums/],
    ['blocks.0.sumsSha256', 'abc', /field blocks\[0\]\.sumsSha256: must be a SHA-256/],
    ['blocks.0.sumsSha256', 'A'.repeat(64), /field blocks\[0\]\.sumsSha256: must be a SHA-256/],
    ['blocks.0.dataPages', -1, /field blocks\[0\]\.dataPages: number must be greater than or equal to 0/],
    ['blocks.0.dataPages', 257, /field blocks\[0\]\.dataPages: 257 exceeds the block's 256 pages/],
    ['configSha256', DELETE, /field configSha256: missing/],
    ['device', DELETE, /field device: missing/],
    ['device.file', '../device.bin', /field device\.file: invalid literal value, expected "device\.bin"/i],
    ['device.file', 'config.bin', /field device\.file: invalid literal value/i],
    ['device.bytes', -1, /field device\.bytes: number must be greater than or equal to 0/],
    ['device.bytes', 2 ** 31, /field device\.bytes: number must be less than or equal to/],
    ['device.sha256', 'zz', /field device\.sha256: must be a SHA-256/],
    ['device.sections', -1, /field device\.sections: number must be greater than or equal to 0/],
    ['device.runstate', 'Running!', /field device\.runstate: must be a QEMU run state/],
    ['metrics', DELETE, /field metrics: missing/],
    ['metrics.setupMs', 'fast', /field metrics\.setupMs: expected number, got string/],
    ['metrics.stage1', DELETE, /field metrics\.stage1: missing/],
    ['metrics.stage3.downtimeMs', null, /field metrics\.stage3\.downtimeMs: expected number, got null/],
    ['metrics.control.metDeadline', 'yes', /field metrics\.control\.metDeadline: expected boolean/],
    ['metrics.control.forcedSwitchover.reason', 'x\u001b]0;pwned\u0007', /reason: must not contain control/],
    ['vmWasRunning', 'yes', /field vmWasRunning: expected boolean, got string/],
    ['vmWasRunning', DELETE, /field vmWasRunning: missing/],
    [
      'guestHeartbeatSeqBefore',
      -1,
      /field guestHeartbeatSeqBefore: number must be greater than or equal to 0/,
    ],
    [
      'signature',
      { alg: 'none', keyId: '0'.repeat(16), mac: '0'.repeat(64) },
      /field signature\.alg: invalid literal/i,
    ],
    [
      'signature',
      { alg: 'hmac-sha256', keyId: 'xyz', mac: '0'.repeat(64) },
      /field signature\.keyId: must be 16/,
    ],
    [
      'signature',
      { alg: 'hmac-sha256', keyId: '0'.repeat(16), mac: 'ab' },
      /field signature\.mac: must be a SHA-256/,
    ],
    ['exec', 'rm -rf ~', /field \(top level\): unknown field "exec" \(format 1\.\d+ has no such field\)/],
  ];
  for (const [field, value, pattern] of cases) {
    const what = value === DELETE ? 'missing' : JSON.stringify(value);
    it(`refuses ${field} = ${what}`, () => refused(mutated(field, value), pattern));
  }

  it('is lenient with metrics: any number, extra keys', () => {
    const m = mutated('metrics.totalMs', -5);
    (m.metrics as Json).newMetric = { anything: [1, 'two'] };
    assert.equal(open(m).metrics.totalMs, -5);
    assert.doesNotThrow(() => open(mutated('metrics.tcgFixup', DELETE)));
  });

  it('passes unknown VM spec keys through (VmSpec grows on its own)', () => {
    const m = mutated('vm.futureOption', { on: true });
    assert.deepEqual((open(m).vm as unknown as Json).futureOption, { on: true });
  });

  it('validates VM disks', () => {
    const disk = { path: '/var/lib/tlc/disk0.qcow2', format: 'qcow2', node: 'tlc-disk0', device: 'tlc-vd0' };
    assert.deepEqual((open(mutated('vm.disks', [disk])).vm as unknown as Json).disks, [disk]);
    refused(
      mutated('vm.disks', [{ ...disk, path: 'disk0.qcow2' }]),
      /field vm\.disks\[0\]\.path: must be an absolute path/,
    );
    refused(
      mutated('vm.disks', [{ ...disk, format: 'vmdk' }]),
      /field vm\.disks\[0\]\.format: invalid enum value/i,
    );
    refused(
      mutated('vm.disks', [{ ...disk, node: 'x,file.filename=/etc/shadow' }]),
      /field vm\.disks\[0\]\.node: must be a QEMU id/,
    );
    refused(mutated('vm.disks', [{ ...disk, device: undefined }]), /field vm\.disks\[0\]\.device: missing/);
    refused(mutated('vm.disks', { path: '/x' }), /field vm\.disks: expected array, got object/);
  });

  it('shows a hostile value without its control characters', () => {
    refused(mutated('mode', 'live\n\u001b[31mok'), /received 'live\\u000a\\u001b\[31mok'/);
    const m = mutated('pageSize', 4096);
    m['x\u001b[2J'] = 1;
    refused(m, /unknown field "x\\u001b\[2J"/);
  });

  it('refuses text that is not a manifest', () => {
    refused('{"magic": "tlc-checkpoint",', /manifest is not valid JSON/);
    refused('[1, 2]', /not a tlc checkpoint manifest/);
    refused('null', /not a tlc checkpoint manifest/);
    refused(mutated('magic', 'tlc-checkpoint2'), /not a tlc checkpoint manifest/);
    refused(mutated('magic', DELETE), /not a tlc checkpoint manifest/);
  });

  it('refuses a checksum that does not match, or none', () => {
    const text = sealManifest(fixtureManifest());
    refused(text.replace('"memMiB": 1', '"memMiB": 2'), /manifest checksum mismatch/);
    const { checksum: _c, ...unsealed } = JSON.parse(text) as Json;
    refused(JSON.stringify(unsealed), /field checksum: missing/);
  });

  describe('format versions', () => {
    const at = (v: unknown): Json => mutated('formatVersion', v);
    it('accepts this version and an older minor', () => {
      assert.doesNotThrow(() => open(at([MANIFEST_FORMAT_MAJOR, MANIFEST_FORMAT_MINOR])));
      assert.doesNotThrow(() => open(at([MANIFEST_FORMAT_MAJOR, 0])));
    });
    it('accepts a newer minor and ignores the fields it adds, anywhere', () => {
      const m = at([MANIFEST_FORMAT_MAJOR, MANIFEST_FORMAT_MINOR + 1]);
      m.futureField = { x: 1 };
      ((m.blocks as Json[])[0] as Json).compression = 'zstd';
      (m.device as Json).futureDevice = true;
      const opened = open(m);
      assert.equal(opened.blocks[0]?.file, 'block-0.img');
    });
    it('still validates the known fields of a newer minor', () => {
      const m = mutated('blocks.0.file', '../../x');
      m.formatVersion = [MANIFEST_FORMAT_MAJOR, MANIFEST_FORMAT_MINOR + 5];
      refused(m, /field blocks\[0\]\.file: must be a tlc image file name/);
    });
    it('refuses unknown fields at this minor or an older one', () => {
      const m = at([MANIFEST_FORMAT_MAJOR, 0]);
      ((m.blocks as Json[])[0] as Json).compression = 'zstd';
      refused(m, /field blocks\[0\]: unknown field "compression"/);
    });
    it('refuses a newer major and an older one, naming the version it reads', () => {
      refused(
        at([MANIFEST_FORMAT_MAJOR + 1, 0]),
        /checkpoint format 2\.0 is not supported \(this tlc reads 1\.x\)/,
      );
      refused(at([0, 9]), /checkpoint format 0\.9 is not supported \(this tlc reads 1\.x\)/);
    });
    it('refuses a malformed version', () => {
      for (const v of [undefined, '1.1', [1], [1, -1], [1, 1.5], [1, 1, 1], ['1', '1']]) {
        refused(at(v ?? DELETE), /field formatVersion: must be \[major, minor\]/);
      }
    });
  });
});

describe('incremental fields (format 1.2)', () => {
  const incremental = (extra: Json = {}): Json => {
    const m = structuredClone(fixtureManifest()) as unknown as Json & { blocks: Json[] };
    m.parent = 'web-20251231-120000-abcd';
    m.storedBytes = 12345;
    m.blocks = m.blocks.map((b, i) => ({
      ...b,
      hashesFile: `block-${i}.img.hashes`,
      hashesSha256: 'a'.repeat(64),
      storedPages: 1,
    }));
    return { ...m, ...extra };
  };

  it('reads a 1.1 manifest (no parent, no page hashes) and a 1.2 incremental one', () => {
    const old = mutated('formatVersion', [MANIFEST_FORMAT_MAJOR, 1]);
    assert.equal(open(old).parent, undefined);
    const m = open(incremental());
    assert.equal(m.parent, 'web-20251231-120000-abcd');
    assert.equal(m.blocks[0]?.hashesFile, 'block-0.img.hashes');
  });

  it('refuses a parent of another VM or itself, and incremental blocks without hashes', () => {
    refused(
      incremental({ parent: 'db-20251231-120000-abcd' }),
      /field parent: must be another checkpoint of VM "web"/,
    );
    refused(incremental({ parent: 'web-20260101-120000-abcd' }), /field parent: must be another checkpoint/);
    const m = incremental() as Json & { blocks: Json[] };
    delete m.blocks[0]?.hashesFile;
    delete m.blocks[0]?.hashesSha256;
    refused(m, /field blocks\[0\]\.hashesFile: missing \(an incremental checkpoint/);
  });

  it('refuses misnamed page-hash and delta files, and partial delta fields', () => {
    const m = incremental() as Json & { blocks: Json[] };
    (m.blocks[0] as Json).hashesFile = 'block-1.img.hashes';
    refused(m, /field blocks\[0\]\.hashesFile: must be block-0\.img\.hashes/);
    const d = incremental() as Json & { blocks: Json[] };
    (d.blocks[0] as Json).deltaFile = 'block-0.img.delta';
    refused(d, /deltaFile, deltaSha256, deltaBytes and deltaPages come together/);
    const full = mutated('blocks.0.deltaFile', 'block-0.img.delta') as Json & { blocks: Json[] };
    Object.assign(full.blocks[0] as Json, { deltaSha256: 'b'.repeat(64), deltaBytes: 10, deltaPages: 1 });
    refused(full, /must be block-0\.img\.delta, in an incremental checkpoint/);
    assert.throws(() => checkpointFilePath('/s/c', 'block-0.img.delta/..'), { code: 'E_CORRUPT' });
    assert.equal(checkpointFilePath('/s/c', 'block-0.img.delta'), '/s/c/block-0.img.delta');
  });
});

describe('checkpoint file names', () => {
  it('joins only tlc file names onto the checkpoint directory', () => {
    assert.equal(checkpointFilePath('/s/c', 'block-3.img'), '/s/c/block-3.img');
    assert.equal(checkpointFilePath('/s/c', 'block-3.img.sums'), '/s/c/block-3.img.sums');
    assert.equal(checkpointFilePath('/s/c', 'device.bin'), '/s/c/device.bin');
    assert.equal(checkpointFilePath('/s/c', 'config.bin'), '/s/c/config.bin');
    for (const bad of [
      '../../x',
      '/etc/passwd',
      'block-0.img/..',
      'block--1.img',
      'manifest.json',
      '',
      '.',
    ]) {
      assert.throws(() => checkpointFilePath('/s/c', bad), { code: 'E_CORRUPT' }, bad);
    }
  });
});
