import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatOptionString, parseOptionString, rewriteAdoptedArgv } from './adopted-argv.js';

const base = {
  ramBlock: 'pc.ram',
  memoryObject: 'memory-backend-file,id=pc.ram,size=256M,mem-path=/ck/block-0.img,share=off',
  consoleLog: '/new/console.log',
};

describe('rewriteAdoptedArgv', () => {
  it('parses QEMU option strings with doubled commas both ways', () => {
    const items = parseOptionString('file,id=s0,path=/a,,b,mux=on');
    assert.deepEqual(items, [
      { key: undefined, value: 'file' },
      { key: 'id', value: 's0' },
      { key: 'path', value: '/a,b' },
      { key: 'mux', value: 'on' },
    ]);
    assert.equal(formatOptionString(items), 'file,id=s0,path=/a,,b,mux=on');
  });

  it('drops their monitors, pid file and daemonize, keeps the machine, supplies main RAM by its id', () => {
    const out = rewriteAdoptedArgv(
      [
        'qemu-system-x86_64',
        '-machine',
        'pc,accel=tcg,memory-backend=mem1',
        '-object',
        'memory-backend-file,id=mem1,size=256M,mem-path=/dev/shm/x,share=on',
        '-m',
        '256',
        '-chardev',
        'socket,id=mon0,path=/run/their.sock,server=on,wait=off',
        '-mon',
        'chardev=mon0,mode=control',
        '-qmp',
        'unix:/run/qmp.sock,server=on,wait=off',
        '-pidfile',
        '/run/q.pid',
        '-daemonize',
        '--kernel',
        '/boot/k',
      ],
      {
        ...base,
        ramBlock: 'mem1',
        memoryObject: 'memory-backend-file,id=mem1,size=256M,mem-path=/ck/i,share=off',
      },
    );
    assert.deepEqual(out, [
      '-machine',
      'pc,accel=tcg',
      '-m',
      '256',
      '-kernel',
      '/boot/k',
      '-object',
      'memory-backend-file,id=mem1,size=256M,mem-path=/ck/i,share=off',
      '-machine',
      'memory-backend=mem1',
    ]);
  });

  it('points console files at the new VM, never at the original log', () => {
    const out = rewriteAdoptedArgv(
      [
        'qemu',
        '-chardev',
        'file,id=s0,path=/var/log/vm.log',
        '-serial',
        'chardev:s0',
        '-serial',
        'file:/var/log/two.log',
      ],
      base,
    );
    assert.deepEqual(out.slice(0, 6), [
      '-chardev',
      'file,id=s0,path=/new/console.log',
      '-serial',
      'chardev:s0',
      '-serial',
      'file:/new/console.log.1',
    ]);
  });

  it("refuses the original's writable disks unless told to keep them, and keeps read-only media", () => {
    const argv = [
      'qemu',
      '-drive',
      'file=/img/root.qcow2,if=virtio',
      '-drive',
      'file=/iso/a.iso,media=cdrom',
    ];
    assert.throws(() => rewriteAdoptedArgv(argv, base), /cannot yet give an adopted VM's disks new overlays/);
    assert.ok(
      rewriteAdoptedArgv(argv, { ...base, keepDisks: true }).includes('file=/img/root.qcow2,if=virtio'),
    );
    assert.ok(
      rewriteAdoptedArgv(argv.slice(0, 1).concat(argv.slice(3)), base).includes(
        'file=/iso/a.iso,media=cdrom',
      ),
    );
  });
});
