import assert from 'node:assert/strict';
import { test } from 'node:test';

import { TlcError } from '../core/errors.js';
import {
  type LaunchArgs,
  type VmSpec,
  diskNames,
  parseDiskArg,
  parseVmSpec,
  qemuArgv,
  qemuOptionValue,
} from './spec.js';

function spec(over: Partial<VmSpec> = {}): VmSpec {
  return {
    specVersion: 1,
    name: 'db',
    qemu: { binary: 'qemu-system-x86_64', version: '7.2.22' },
    machine: 'pc-i440fx-7.2',
    accel: 'tcg',
    memMiB: 256,
    cpus: 1,
    memory: { kind: 'memfd' },
    kernel: '/k,dir/vmlinuz',
    extraArgs: [],
    ...over,
  };
}

const launch: LaunchArgs = {
  qmpSocket: '/run/a,b/qmp.sock',
  consoleLog: '/run/a,b/console,log',
  pidFile: '/run/a,b/qemu.pid',
};

/** The value following `flag` whose text starts with `prefix`. */
function optionOf(argv: string[], flag: string, prefix: string): string | undefined {
  for (let i = 0; i < argv.length - 1; i++) {
    const value = argv[i + 1] as string;
    if (argv[i] === flag && value.startsWith(prefix)) return value;
  }
  return undefined;
}

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof TlcError ? err.code : 'not a TlcError';
  }
  return undefined;
}

test('qemuOptionValue doubles commas and refuses newlines and NULs', () => {
  assert.equal(qemuOptionValue('/a,b,,c'), '/a,,b,,,,c');
  assert.equal(qemuOptionValue('/plain/path'), '/plain/path');
  assert.equal(
    code(() => qemuOptionValue('/a\nb')),
    'E_VM_SPEC',
  );
  assert.equal(
    code(() => qemuOptionValue('/a\0b')),
    'E_VM_SPEC',
  );
});

test('qemuArgv doubles commas in the console, QMP socket, memory file and disk paths', () => {
  const argv = qemuArgv(
    spec({
      memory: { kind: 'file', path: '/ram,dir/guest,ram', share: false },
      disks: [
        { path: '/img,s/root,1.qcow2', format: 'qcow2', ...diskNames(0) },
        { path: '/img,s/data.raw', format: 'raw', ...diskNames(1), readOnly: true },
      ],
    }),
    launch,
  );
  assert.equal(
    optionOf(argv, '-object', 'memory-backend-file'),
    'memory-backend-file,id=ram0,size=256M,mem-path=/ram,,dir/guest,,ram,share=off',
  );
  assert.equal(optionOf(argv, '-chardev', 'file'), 'file,id=ser0,path=/run/a,,b/console,,log');
  assert.equal(optionOf(argv, '-qmp', 'unix:'), 'unix:/run/a,,b/qmp.sock,server=on,wait=off');
  assert.deepEqual(argv.slice(argv.indexOf('-blockdev')), [
    '-blockdev',
    'driver=file,node-name=tlc-disk0-file,filename=/img,,s/root,,1.qcow2',
    '-blockdev',
    'driver=qcow2,node-name=tlc-disk0,file=tlc-disk0-file',
    '-device',
    'virtio-blk-pci,drive=tlc-disk0,id=tlc-vd0',
    '-blockdev',
    'driver=file,node-name=tlc-disk1-file,filename=/img,,s/data.raw,read-only=on',
    '-blockdev',
    'driver=raw,node-name=tlc-disk1,file=tlc-disk1-file,read-only=on',
    '-device',
    'virtio-blk-pci,drive=tlc-disk1,id=tlc-vd1',
  ]);
  // Whole-argument paths are not option strings: left as they are.
  assert.equal(argv[argv.indexOf('-kernel') + 1], '/k,dir/vmlinuz');
  assert.equal(argv[argv.indexOf('-pidfile') + 1], '/run/a,b/qemu.pid');
});

test('qemuArgv puts disks before the verbatim extra arguments and omits them when there are none', () => {
  const extraArgs = ['-device', 'virtio-rng-pci'];
  const withDisk = qemuArgv(
    spec({ disks: [{ path: '/d.raw', format: 'raw', ...diskNames(0) }], extraArgs }),
    launch,
  );
  assert.ok(withDisk.indexOf('-blockdev') < withDisk.indexOf('virtio-rng-pci'));
  assert.deepEqual(withDisk.slice(-2), extraArgs);
  assert.ok(!qemuArgv(spec(), launch).includes('-blockdev'));
});

test('qemuArgv refuses a path with a newline', () => {
  assert.equal(
    code(() => qemuArgv(spec(), { ...launch, consoleLog: '/run/x\n/console.log' })),
    'E_VM_SPEC',
  );
  const disks = [{ path: '/img/a\nb.qcow2', format: 'qcow2' as const, ...diskNames(0) }];
  assert.equal(
    code(() => qemuArgv(spec({ disks }), launch)),
    'E_VM_SPEC',
  );
});

test('an adopted command line gets the escaped QMP socket too', () => {
  const argv = qemuArgv(
    spec({ adoptedArgv: ['qemu-system-x86_64', '-qmp', 'unix:/old.sock,server=on', '-m', '128M'] }),
    launch,
  );
  assert.deepEqual(argv, [
    '-m',
    '128M',
    // Main RAM always comes from a backend tlc names, so a checkpoint's image can supply it.
    '-object',
    'memory-backend-memfd,id=ram0,size=256M,share=on',
    '-machine',
    'memory-backend=ram0',
    '-qmp',
    'unix:/run/a,,b/qmp.sock,server=on,wait=off',
    '-pidfile',
    launch.pidFile,
  ]);
});

test('parseDiskArg reads a path, its format and read-only flag, with ",," for a comma', () => {
  assert.deepEqual(parseDiskArg('/img/root.qcow2'), { path: '/img/root.qcow2' });
  assert.deepEqual(parseDiskArg('/img/data.raw,format=raw'), { path: '/img/data.raw', format: 'raw' });
  assert.deepEqual(parseDiskArg('/a,,b/c,,,,d.img,format=qcow2,readonly=on'), {
    path: '/a,b/c,,d.img',
    format: 'qcow2',
    readOnly: true,
  });
  assert.deepEqual(parseDiskArg('d.img,readonly=off'), { path: 'd.img', readOnly: false });
  for (const bad of ['', ',format=raw', '/x,format=vmdk', '/x,cache=none', '/x,', '/a,b']) {
    assert.equal(
      code(() => parseDiskArg(bad)),
      'E_USAGE',
      bad,
    );
  }
});

test('parseVmSpec keeps disks, accepts specs without them and rejects malformed ones', () => {
  const disks = [{ path: '/d.qcow2', format: 'qcow2', node: 'tlc-disk0', device: 'tlc-vd0' }];
  assert.deepEqual(
    parseVmSpec(JSON.parse(JSON.stringify(spec({ disks: disks as VmSpec['disks'] }))), 'x').disks,
    disks,
  );
  const { extraArgs: _drop, ...old } = spec();
  assert.equal(parseVmSpec(old, 'x').disks, undefined);
  assert.deepEqual(parseVmSpec(old, 'x').extraArgs, []);
  for (const bad of [
    { disks: 'x' },
    { disks: [{ path: '/d', format: 'vmdk', node: 'n', device: 'd' }] },
    { disks: [{}] },
  ]) {
    assert.equal(
      code(() => parseVmSpec({ ...spec(), ...bad }, 'vm.json')),
      'E_VM_SPEC',
    );
  }
});
