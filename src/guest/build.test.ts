import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { GuestBuildError, TlcError } from '../core/errors.js';
import {
  buildGuest,
  defaultGuestCacheDir,
  formatWorkloadSpec,
  guestAppendLine,
  moduleLoadOrder,
  parseModinfo,
  parseWorkloadSpec,
  workloadUsesDisk,
} from './build.js';

test('parses workload specs', () => {
  assert.deepEqual(parseWorkloadSpec('memverify:64'), { kind: 'memverify', mib: 64, rate: 0 });
  assert.deepEqual(parseWorkloadSpec('memverify:64:1000'), { kind: 'memverify', mib: 64, rate: 1000 });
  assert.deepEqual(parseWorkloadSpec('memverify:8:0'), { kind: 'memverify', mib: 8, rate: 0 });
  assert.deepEqual(parseWorkloadSpec('memverify:900:0:grow'), {
    kind: 'memverify',
    mib: 900,
    rate: 0,
    grow: true,
  });
  assert.equal(formatWorkloadSpec(parseWorkloadSpec('memverify:900:0:grow')), 'memverify:900:0:grow');
  assert.throws(() => parseWorkloadSpec('memverify:900:0:shrink'), /Bad workload/);
  assert.deepEqual(parseWorkloadSpec('dirty:128:random'), { kind: 'dirty', mib: 128, pattern: 'random' });
  assert.deepEqual(parseWorkloadSpec('dirty:1:stream'), { kind: 'dirty', mib: 1, pattern: 'stream' });
  assert.deepEqual(parseWorkloadSpec('dirty:32:hotcold'), { kind: 'dirty', mib: 32, pattern: 'hotcold' });
  assert.deepEqual(parseWorkloadSpec('dirty:32:bytes'), { kind: 'dirty', mib: 32, pattern: 'bytes' });
  assert.deepEqual(parseWorkloadSpec('idle'), { kind: 'idle' });
  assert.deepEqual(parseWorkloadSpec('diskverify:0'), { kind: 'diskverify', records: 0 });
  assert.deepEqual(parseWorkloadSpec('diskverify:500'), { kind: 'diskverify', records: 500 });
});

test('parses diskverify beside one memory workload, in either order', () => {
  const combined = {
    kind: 'combined',
    disk: { kind: 'diskverify', records: 0 },
    memory: { kind: 'memverify', mib: 32, rate: 0 },
  };
  assert.deepEqual(parseWorkloadSpec('diskverify:0+memverify:32'), combined);
  assert.deepEqual(parseWorkloadSpec('memverify:32+diskverify:0'), combined);
  assert.equal(
    formatWorkloadSpec(parseWorkloadSpec('memverify:32+diskverify:00')),
    'diskverify:0+memverify:32',
  );
  assert.equal(
    formatWorkloadSpec(parseWorkloadSpec('diskverify:9+dirty:8:random')),
    'diskverify:9+dirty:8:random',
  );
  assert.equal(workloadUsesDisk(parseWorkloadSpec('diskverify:0+memverify:32')), true);
  assert.equal(workloadUsesDisk(parseWorkloadSpec('diskverify:1')), true);
  assert.equal(workloadUsesDisk(parseWorkloadSpec('memverify:32')), false);
});

test('rejects bad workload specs with a usage error naming the spec', () => {
  for (const spec of [
    '',
    'memverify',
    'memverify:',
    'memverify:abc',
    'memverify:0',
    'memverify:-1',
    'memverify:1.5',
    'memverify:64:fast',
    'memverify:64:1:2',
    'memverify:99999999',
    'dirty:64',
    'dirty:64:sideways',
    'dirty:x:random',
    'idle:1',
    'Idle',
    'busy',
    'memverify:64 quiet',
    'diskverify',
    'diskverify:',
    'diskverify:x',
    'diskverify:1:2',
    'diskverify:0+',
    '+diskverify:0',
    'diskverify:0+diskverify:1',
    'diskverify:0+idle',
    'memverify:8+dirty:8:random',
    'diskverify:0+memverify:8+dirty:8:random',
  ]) {
    assert.throws(
      () => parseWorkloadSpec(spec),
      (err: unknown) =>
        err instanceof TlcError && err.code === 'E_USAGE' && err.message.includes(`"${spec}"`),
      spec,
    );
  }
});

test('formats specs canonically', () => {
  assert.equal(formatWorkloadSpec(parseWorkloadSpec('memverify:064:0')), 'memverify:64');
  assert.equal(formatWorkloadSpec(parseWorkloadSpec('memverify:64:500')), 'memverify:64:500');
  assert.equal(formatWorkloadSpec(parseWorkloadSpec('dirty:8:hotcold')), 'dirty:8:hotcold');
});

test('kernel command line puts the console on ttyS0 and ends with the workload', () => {
  const line = guestAppendLine('memverify:64');
  const params = line.split(' ');
  assert.equal(params[0], 'console=ttyS0');
  assert.equal(params.at(-1), 'tlc.workload=memverify:64');
  assert.ok(params.includes('quiet'));
  assert.ok(!params.some((p) => p.startsWith('root=')));
  assert.equal(guestAppendLine('idle').split(' ').at(-1), 'tlc.workload=idle');
  assert.throws(() => guestAppendLine('memverify:abc'), /Bad workload "memverify:abc"/);
});

/** A minimal ELF64 LE object: a null section, `.modinfo` holding `strings`, and `.shstrtab`. */
function fakeModule(strings: string[]): Buffer {
  const modinfo = Buffer.from(strings.map((x) => `${x}\0`).join(''));
  const shstrtab = Buffer.from('\0.modinfo\0.shstrtab\0');
  const header = Buffer.alloc(0x40);
  header.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  const shoff = 0x40 + modinfo.length + shstrtab.length;
  header.writeBigUInt64LE(BigInt(shoff), 0x28);
  header.writeUInt16LE(0x40, 0x3a);
  header.writeUInt16LE(3, 0x3c);
  header.writeUInt16LE(2, 0x3e);
  const sections = Buffer.alloc(3 * 0x40);
  const put = (i: number, name: number, offset: number, size: number): void => {
    sections.writeUInt32LE(name, i * 0x40);
    sections.writeBigUInt64LE(BigInt(offset), i * 0x40 + 0x18);
    sections.writeBigUInt64LE(BigInt(size), i * 0x40 + 0x20);
  };
  put(1, 1, 0x40, modinfo.length);
  put(2, 10, 0x40 + modinfo.length, shstrtab.length);
  return Buffer.concat([header, modinfo, shstrtab, sections]);
}

test("reads a kernel module's .modinfo and rejects what is not one", () => {
  const info = parseModinfo(fakeModule(['license=GPL', 'depends=virtio,virtio_ring', 'name=virtio_blk']));
  assert.equal(info.get('depends'), 'virtio,virtio_ring');
  assert.equal(info.get('name'), 'virtio_blk');
  assert.equal(parseModinfo(fakeModule(['depends='])).get('depends'), '');
  const truncated = fakeModule(['depends=x']).subarray(0, 0x50);
  for (const bad of [Buffer.from('not an elf file at all, but long enough for a header.......'), truncated]) {
    assert.throws(
      () => parseModinfo(bad, 'm.ko'),
      (err: unknown) => err instanceof GuestBuildError,
    );
  }
});

test('orders modules after their dependencies and skips built-in ones', () => {
  const deps: Record<string, string[] | null> = {
    virtio_pci: ['virtio_ring', 'virtio_pci_modern_dev', 'virtio'],
    virtio_blk: ['virtio', 'virtio_ring'],
    virtio: ['virtio_ring'],
    virtio_ring: [],
    virtio_pci_modern_dev: [],
    ext4: null,
  };
  assert.deepEqual(
    moduleLoadOrder(['virtio_pci', 'virtio_blk', 'ext4'], (n) =>
      n in deps ? (deps[n] as string[] | null) : [],
    ),
    ['virtio_ring', 'virtio_pci_modern_dev', 'virtio', 'virtio_pci', 'virtio_blk'],
  );
  assert.throws(
    () => moduleLoadOrder(['a'], (n) => (n === 'a' ? ['b'] : ['a'])),
    /module dependency cycle a -> b -> a/,
  );
});

test('default cache dir honours TLC_GUEST_DIR, then XDG_CACHE_HOME, then ~/.cache', () => {
  const saved = { tlc: process.env['TLC_GUEST_DIR'], xdg: process.env['XDG_CACHE_HOME'] };
  try {
    process.env['TLC_GUEST_DIR'] = '/srv/guest';
    process.env['XDG_CACHE_HOME'] = '/var/cache/me';
    assert.equal(defaultGuestCacheDir(), '/srv/guest');
    delete process.env['TLC_GUEST_DIR'];
    assert.equal(defaultGuestCacheDir(), '/var/cache/me/tlc/guest');
    delete process.env['XDG_CACHE_HOME'];
    assert.equal(defaultGuestCacheDir(), join(homedir(), '.cache', 'tlc', 'guest'));
  } finally {
    for (const [key, value] of [
      ['TLC_GUEST_DIR', saved.tlc],
      ['XDG_CACHE_HOME', saved.xdg],
    ] as const) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }
});

function hostHas(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

async function withPath<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const saved = process.env['PATH'];
  process.env['PATH'] = path;
  try {
    return await fn();
  } finally {
    process.env['PATH'] = saved;
  }
}

test('names a missing tool and how to install it', async (t) => {
  const tools = ['apt-get', 'apt-cache', 'dpkg'];
  if (process.platform !== 'linux' || process.arch !== 'x64' || !tools.every(hostHas)) {
    return t.skip('needs an x86-64 Debian host');
  }
  const dir = await mkdtemp(join(tmpdir(), 'tlc-guest-test-'));
  try {
    // A PATH holding apt and dpkg but no gcc.
    const bin = join(dir, 'bin');
    await mkdir(bin);
    for (const tool of tools) {
      const real = execFileSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim();
      await symlink(real, join(bin, tool));
    }
    await withPath(bin, async () => {
      await assert.rejects(
        buildGuest({ cacheDir: join(dir, 'cache'), force: true }),
        (err: unknown) =>
          err instanceof GuestBuildError &&
          err.message === 'Cannot build guest: gcc not found; install it with apt-get install gcc',
      );
    });
    await withPath(join(dir, 'empty'), async () => {
      await assert.rejects(buildGuest({ cacheDir: join(dir, 'cache') }), /apt-get not found; install it/);
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('reports a missing guest source directory', async () => {
  await assert.rejects(
    buildGuest({ cacheDir: join(tmpdir(), 'tlc-unused'), sourceDir: '/nonexistent/guest' }),
    (err: unknown) => err instanceof GuestBuildError && /cannot read \/nonexistent\/guest/.test(err.message),
  );
});

// Builds into the shared default cache (so it is slow only the first time on a machine,
// and integration tests reuse the result), then proves the cached path runs no tools.
test('a second build with unchanged inputs returns the cached image without running apt or gcc', async (t) => {
  if (process.env['TLC_SKIP_GUEST_BUILD']) return t.skip('TLC_SKIP_GUEST_BUILD is set');
  if (process.platform !== 'linux' || process.arch !== 'x64' || !['apt-get', 'gcc'].every(hostHas)) {
    return t.skip('needs an x86-64 Debian host with apt-get and gcc');
  }
  const cacheDir = defaultGuestCacheDir();
  const first = await buildGuest({ cacheDir });
  assert.match(first.kernelVersion, /^\d+\.\d+\.\d+-\d+-cloud-amd64$/);
  const lines: string[] = [];
  const started = Date.now();
  const second = await withPath('/nonexistent', () => buildGuest({ cacheDir, log: (l) => lines.push(l) }));
  assert.deepEqual(second, first);
  assert.ok(Date.now() - started < 2000, 'cached lookup is immediate');
  assert.match(lines.join('\n'), /using cached image/);
});
