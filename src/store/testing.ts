import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { hashFile } from '../core/fsutil.js';
import type { VmDisk } from '../vm/spec.js';
import {
  CONFIG_FILE,
  DEVICE_FILE,
  MANIFEST_FILE,
  MANIFEST_FORMAT_MAJOR,
  MANIFEST_FORMAT_MINOR,
  MANIFEST_MAGIC,
  type DiskLayer,
  type Manifest,
  type ManifestDisk,
  PAGE_SIZE,
  SUMS_CHUNK_BYTES,
  imageFileName,
  sealManifest,
  sha256Hex,
  sumsFileName,
} from './manifest.js';
import { chunkCount, hashChunk, newSums } from './sums.js';

/**
 * Test support (no QEMU): a valid manifest built in code, and real checkpoint directories with
 * every file the manifest names, so the store and verify can be tested end to end.
 */

const CONFIG = Buffer.from('QEVM\u0000\u0000\u0000\u0003config section of a test checkpoint');
const DEVICE = Buffer.from('device state of a test checkpoint, sections 1..7');

export interface FixtureBlock {
  name: string;
  usedLength: number;
  /** Byte offsets that hold a non-zero byte (each makes its page a data page). */
  dataAt: number[];
}

const DEFAULT_BLOCKS: FixtureBlock[] = [
  { name: 'ram0', usedLength: 1024 * 1024, dataAt: [0, 5 * PAGE_SIZE + 7] },
  { name: '/rom@etc/acpi/tables', usedLength: 128 * 1024, dataAt: [100] },
];

function imageOf(b: FixtureBlock): Buffer {
  const data = Buffer.alloc(b.usedLength);
  for (const at of b.dataAt) data[at] = 0xa5;
  return data;
}

function sumsOf(data: Buffer): Buffer {
  const sums = newSums(data.length);
  for (let c = 0; c < chunkCount(data.length); c++) {
    hashChunk(data.subarray(c * SUMS_CHUNK_BYTES, (c + 1) * SUMS_CHUNK_BYTES), sums, c);
  }
  return sums;
}

export interface FixtureOptions {
  vm?: string;
  id?: string;
  createdAt?: string;
  blocks?: FixtureBlock[];
  /** The manifest's `disks`, and the VM spec's (`vm.disks`); the layer files are the caller's. */
  disks?: ManifestDisk[];
  vmDisks?: VmDisk[];
}

/** A `DiskLayer` describing the file `<dir>/<file>` as it is now (size and SHA-256). */
export function diskLayerOf(dir: string, file: string, backing?: string): DiskLayer {
  const { bytes, sha256 } = hashFile(path.join(dir, file));
  return { file, bytes, sha256, ...(backing !== undefined ? { backing } : {}) };
}

/** A valid, unsealed manifest (no checksum, no signature) describing the fixture files. */
export function fixtureManifest(opts: FixtureOptions = {}): Manifest {
  const vm = opts.vm ?? 'web';
  const blocks = opts.blocks ?? DEFAULT_BLOCKS;
  return {
    magic: MANIFEST_MAGIC,
    formatVersion: [MANIFEST_FORMAT_MAJOR, MANIFEST_FORMAT_MINOR],
    id: opts.id ?? `${vm}-20260101-120000-abcd`,
    createdAt: opts.createdAt ?? '2026-01-01T12:00:00.000Z',
    mode: 'live',
    vm: {
      specVersion: 1,
      name: vm,
      qemu: { binary: '/usr/bin/qemu-system-x86_64', version: '7.2.0' },
      machine: 'pc-i440fx-7.2',
      accel: 'tcg',
      memMiB: 1,
      cpus: 2,
      memory: { kind: 'memfd' },
      kernel: '/var/lib/tlc/guest/vmlinuz',
      initrd: '/var/lib/tlc/guest/initrd.img',
      append: 'console=ttyS0 quiet',
      workload: 'memverify:1',
      extraArgs: ['-device', 'virtio-rng-pci'],
      ...(opts.vmDisks ? { disks: opts.vmDisks } : {}),
    },
    qemuVersion: '7.2.0',
    machineType: 'pc-i440fx-7.2',
    pageSize: PAGE_SIZE,
    ramSection: { sectionId: 2, instanceId: 0, versionId: 4 },
    blocks: blocks.map((b, i) => ({
      name: b.name,
      usedLength: b.usedLength,
      file: imageFileName(i),
      sumsFile: sumsFileName(i),
      sumsSha256: sha256Hex(sumsOf(imageOf(b))),
      dataPages: new Set(b.dataAt.map((at) => Math.floor(at / PAGE_SIZE))).size,
    })),
    configSha256: sha256Hex(CONFIG),
    device: {
      file: DEVICE_FILE,
      bytes: DEVICE.length,
      sha256: sha256Hex(DEVICE),
      sections: 7,
      runstate: 'running',
    },
    ...(opts.disks ? { disks: opts.disks } : {}),
    metrics: {
      setupMs: 14,
      warmUpMs: 3,
      stage1: { ms: 736, bytes: 126_000_000 },
      stage2: { iterations: 2, ms: 276, bytes: 50_000_000 },
      stage3: { ms: 236, bytes: 37_000_000, downtimeMs: 236.4 },
      totalMs: 1260,
      durableMs: 1660,
      qemuDowntimeMs: 41,
      bytesReceived: 213_000_000,
      bytesStored: 120_000_000,
      tcgFixup: { pages: 18, ms: 199 },
      control: {
        deadlineMs: 10_000,
        maxThrottlePct: 0,
        forcedSwitchover: { atMs: 900, reason: 'deadline close', expectedDowntimeMs: 200 },
        metDeadline: true,
      },
    },
    vmWasRunning: true,
    guestHeartbeatSeqBefore: 21,
  };
}

/** Writes every file of a fixture checkpoint into `dir` (manifest sealed, signed with `key`). */
export function writeFixtureFiles(dir: string, opts: FixtureOptions & { key?: Buffer } = {}): Manifest {
  const m = fixtureManifest(opts);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  fs.writeFileSync(path.join(dir, CONFIG_FILE), CONFIG);
  fs.writeFileSync(path.join(dir, DEVICE_FILE), DEVICE);
  (opts.blocks ?? DEFAULT_BLOCKS).forEach((b, i) => {
    const data = imageOf(b);
    fs.writeFileSync(path.join(dir, imageFileName(i)), data);
    fs.writeFileSync(path.join(dir, sumsFileName(i)), sumsOf(data));
  });
  fs.writeFileSync(path.join(dir, MANIFEST_FILE), sealManifest(m, opts.key));
  return m;
}

/** A complete, published checkpoint `<storeDir>/<id>`; returns its manifest. */
export function writeFixtureCheckpoint(
  storeDir: string,
  opts: FixtureOptions & { key?: Buffer } = {},
): Manifest {
  const id = fixtureManifest(opts).id;
  return writeFixtureFiles(path.join(storeDir, id), opts);
}

/** The one qcow2 disk the disk-layer tests give their VM. */
export const TEST_VM_DISK: VmDisk = {
  path: '/var/lib/tlc-test/web.qcow2',
  format: 'qcow2',
  node: 'tlc-disk0',
  device: 'tlc-vd0',
};

/** Runs qemu-img (C locale), returning its stdout. */
export function runQemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
}
