/**
 * Which mapping of a QEMU process is guest RAM: parsed from maps text shaped like QEMU 7.2's
 * (captured from `qemu-system-x86_64 -m 64M` with a memfd ram0, a second memfd backend and a
 * private file backend), so look-alikes can be placed at will.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CheckpointError } from '../core/errors.js';
import { GuestRam, GuestRamError, findRamMapping, parseMaps, type RamBacking } from './guest-ram.js';
import { identify } from './process.js';
import type { VmSpec } from './spec.js';

const MiB = 1024 * 1024;
const RAM = 64 * MiB;
const MEMFD: RamBacking = { kind: 'memfd' };

/** One maps line; `name` empty for anonymous memory. */
function line(
  start: number,
  bytes: number,
  opts: { offset?: number; inode?: number; dev?: string; name?: string },
): string {
  const hex = (v: number): string => v.toString(16).padStart(12, '0');
  const inode = String(opts.inode ?? 0);
  const head = `${hex(start)}-${hex(start + bytes)} rw-s ${(opts.offset ?? 0).toString(16).padStart(8, '0')} ${opts.dev ?? '00:01'} ${inode}`;
  return opts.name ? `${head.padEnd(73)}${opts.name}` : head;
}

const memfd = (start: number, bytes: number, inode: number, offset = 0): string =>
  line(start, bytes, { inode, offset, name: '/memfd:memory-backend-memfd (deleted)' });

/** The surroundings every QEMU has: binary, heap, libraries, anonymous memory, stack. */
const BACKGROUND = [
  line(0x55d4_1c40_0000, 0x1000, { dev: 'fe:00', inode: 3_940_112, name: '/usr/bin/qemu-system-x86_64' }),
  line(0x55d4_1e00_0000, 0x4_2000, { name: '[heap]' }),
  line(0x7f66_5800_0000, RAM, {}),
  line(0x7f66_6c00_0000, 0x1c_000, {
    dev: 'fe:00',
    inode: 1_181_770,
    name: '/usr/lib/x86_64-linux-gnu/libc.so.6',
  }),
  line(0x7ffd_3a00_0000, 0x21_000, { name: '[stack]' }),
  'ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]',
];

function maps(...lines: string[]): string {
  return [...BACKGROUND.slice(0, 3), ...lines, ...BACKGROUND.slice(3)].join('\n') + '\n';
}

function mapping(text: string, backing: RamBacking = MEMFD): { inode: bigint; start: number } {
  const r = findRamMapping(text, RAM, backing);
  assert.ok('mapping' in r, 'reason' in r ? r.reason : '');
  return { inode: r.mapping.inode, start: r.mapping.start };
}

function refusal(text: string, backing: RamBacking = MEMFD): string {
  const r = findRamMapping(text, RAM, backing);
  assert.ok('reason' in r, `expected a refusal, got inode ${'mapping' in r ? r.mapping.inode : ''}`);
  return r.reason;
}

describe('parseMaps', () => {
  it('reads every field, names with spaces, anonymous lines and the vsyscall page', () => {
    const entries = parseMaps(
      maps(
        memfd(0x7f66_63ff_e000, RAM, 26),
        line(0x7f00_0000_0000, 0x1000, { inode: 7, name: '/tmp/a b (deleted)' }),
      ),
    );
    const ram = entries.find((e) => e.inode === 26n);
    assert.deepEqual(ram, {
      start: 0x7f66_63ff_e000,
      end: 0x7f66_63ff_e000 + RAM,
      offset: 0,
      dev: '00:01',
      inode: 26n,
      name: '/memfd:memory-backend-memfd (deleted)',
    });
    assert.equal(entries.find((e) => e.inode === 7n)?.name, '/tmp/a b (deleted)');
    const anon = entries.find((e) => e.start === 0x7f66_5800_0000);
    assert.equal(anon?.name, '');
    assert.equal(anon?.inode, 0n);
    // The vsyscall page lies beyond 2^53: skipped rather than misread.
    assert.equal(entries.length, BACKGROUND.length - 1 + 2);
  });
});

describe('findRamMapping', () => {
  it('takes the one memfd of exactly the RAM size at offset 0', () => {
    assert.deepEqual(mapping(maps(memfd(0x7f66_63ff_e000, RAM, 26))), {
      inode: 26n,
      start: 0x7f66_63ff_e000,
    });
  });

  it('ignores a bigger look-alike memfd, even listed first', () => {
    const text = maps(memfd(0x7f00_0000_0000, 2 * RAM, 30), memfd(0x7f66_63ff_e000, RAM, 26));
    assert.deepEqual(mapping(text), { inode: 26n, start: 0x7f66_63ff_e000 });
  });

  it('ignores a smaller look-alike and a same-size mapping at a non-zero offset', () => {
    const text = maps(
      memfd(0x7f00_0000_0000, RAM / 2, 31),
      memfd(0x7f10_0000_0000, RAM, 32, 0x20_0000),
      memfd(0x7f66_63ff_e000, RAM, 26),
    );
    assert.deepEqual(mapping(text), { inode: 26n, start: 0x7f66_63ff_e000 });
  });

  it('ignores memfds with another name', () => {
    const other = line(0x7f00_0000_0000, RAM, { inode: 40, name: '/memfd:memory-backend-memfd-x (deleted)' });
    const other2 = line(0x7f10_0000_0000, RAM, { inode: 41, name: '/memfd:qemu-guest (deleted)' });
    assert.equal(mapping(maps(other, other2, memfd(0x7f66_63ff_e000, RAM, 26))).inode, 26n);
  });

  it('refuses two look-alike memfds of the same size (a second memory backend)', () => {
    // As captured: QEMU with ram0 and a second 64 MiB memory-backend-memfd.
    const reason = refusal(maps(memfd(0x7f66_63ff_e000, RAM, 26), memfd(0x7f66_67ff_f000, RAM, 25)));
    assert.match(reason, /2 distinct memfd .* mappings of exactly 67108864 bytes/);
    assert.match(reason, /00:01\/26, 00:01\/25/);
    assert.match(reason, /cannot tell which is guest RAM/);
  });

  it('accepts one memfd mapped twice (one inode)', () => {
    const text = maps(memfd(0x7f66_63ff_e000, RAM, 26), memfd(0x7f70_0000_0000, RAM, 26));
    assert.deepEqual(mapping(text), { inode: 26n, start: 0x7f66_63ff_e000 });
  });

  it('refuses when no mapping fits, naming what it looked for', () => {
    assert.match(
      refusal(maps()),
      /no mapping of memfd \/memfd:memory-backend-memfd with exactly 67108864 bytes/,
    );
    assert.match(refusal(maps(memfd(0x7f00_0000_0000, 2 * RAM, 30))), /no mapping/);
  });

  it('file backend: exactly the path, not a look-alike path or a deleted file', () => {
    const file: RamBacking = { kind: 'file', path: '/var/lib/tlc/vm/ram' };
    const at = (start: number, inode: number, name: string): string =>
      line(start, RAM, { dev: 'fe:00', inode, name });
    const text = maps(
      at(0x7f00_0000_0000, 50, '/var/lib/tlc/vm/ram.bak'),
      at(0x7f10_0000_0000, 51, '/var/lib/tlc/vm/ram (deleted)'),
      at(0x7f20_0000_0000, 52, '/var/lib/tlc/vm'),
      memfd(0x7f30_0000_0000, RAM, 26),
      at(0x7f66_5fff_d000, 2_146_530, '/var/lib/tlc/vm/ram'),
    );
    assert.deepEqual(mapping(text, file), { inode: 2_146_530n, start: 0x7f66_5fff_d000 });
    // A memfd backend does not take the file, and the file backend does not take a memfd.
    assert.equal(mapping(text, MEMFD).inode, 26n);
    assert.match(
      refusal(maps(memfd(0x7f30_0000_0000, RAM, 26)), file),
      /no mapping of file \/var\/lib\/tlc\/vm\/ram/,
    );
  });

  it('file backend: two different files at the same path (replaced while mapped) are refused', () => {
    const file: RamBacking = { kind: 'file', path: '/var/lib/tlc/vm/ram' };
    const text = maps(
      line(0x7f00_0000_0000, RAM, { dev: 'fe:00', inode: 60, name: '/var/lib/tlc/vm/ram' }),
      line(0x7f10_0000_0000, RAM, { dev: 'fe:00', inode: 61, name: '/var/lib/tlc/vm/ram' }),
    );
    assert.match(refusal(text, file), /2 distinct file/);
  });
});

describe('GuestRam.open', () => {
  const spec = (memory: VmSpec['memory']): VmSpec => ({ name: 'vm1', memMiB: 64, memory }) as VmSpec;

  it('refuses anonymous RAM with a typed error and a reason', () => {
    assert.throws(
      () => GuestRam.open({ pid: process.pid, startTicks: 0 }, spec({ kind: 'ram' })),
      (err: unknown) =>
        err instanceof GuestRamError &&
        err instanceof CheckpointError &&
        err.code === 'E_CHECKPOINT' &&
        /anonymous/.test(err.reason) &&
        err.message.includes('"vm1"'),
    );
  });

  it('refuses a process that maps no memory backend (this one), and a process that is gone', () => {
    const self = identify(process.pid);
    assert.ok(self);
    assert.throws(
      () => GuestRam.open(self, spec({ kind: 'memfd' })),
      (err: unknown) => err instanceof GuestRamError && /no mapping of memfd/.test(err.reason),
    );
    assert.throws(
      () => GuestRam.open({ pid: process.pid, startTicks: self.startTicks + 1 }, spec({ kind: 'memfd' })),
      (err: unknown) => err instanceof GuestRamError && /no longer running/.test(err.reason),
    );
  });
});
