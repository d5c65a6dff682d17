import { createHash } from 'node:crypto';
import { TlcError } from '../core/errors.js';
import type { VmSpec } from '../vm/spec.js';

/**
 * A checkpoint directory, published atomically by renaming `.tmp-<id>` to `<id>`:
 *
 * | file              | holds                                                                   |
 * |-------------------|-------------------------------------------------------------------------|
 * | manifest.json     | this manifest: magic, format version, checksum over the rest of the JSON |
 * | config.bin        | the stream's configuration section, verbatim (machine type, capabilities) |
 * | block-<n>.img     | RAM block n as a raw image at its own offsets; sparse where the guest has zeros. Large blocks (ram0) are mapped by lazy restore |
 * | block-<n>.sums    | `TLCSUMS1`, be32 chunk size, be32 count, then count x 32-byte SHA-256 of each chunk (all-zero hash for an all-zero chunk) |
 * | device.bin        | device state: every section after RAM, EOF and the VM description, verbatim |
 */
export const MANIFEST_MAGIC = 'tlc-checkpoint';
export const MANIFEST_FORMAT_MAJOR = 1;
export const MANIFEST_FORMAT_MINOR = 0;
export const MANIFEST_FILE = 'manifest.json';
export const CONFIG_FILE = 'config.bin';
export const DEVICE_FILE = 'device.bin';
export const SUMS_MAGIC = 'TLCSUMS1';
export const SUMS_CHUNK_BYTES = 1024 * 1024;

export type CheckpointMode = 'live' | 'cow' | 'stop';

export interface ManifestBlock {
  name: string;
  usedLength: number;
  /** Image file inside the checkpoint directory. */
  file: string;
  sumsFile: string;
  /** SHA-256 of the sums file, so a damaged sums file is caught too. */
  sumsSha256: string;
  /** Pages that hold data (not all-zero) at checkpoint time. */
  dataPages: number;
}

export interface StageMetrics {
  /** Includes `warmUpMs`: faulting in the page table before QEMU starts sending. */
  setupMs: number;
  warmUpMs?: number;
  stage1: { ms: number; bytes: number };
  stage2: { iterations: number; ms: number; bytes: number };
  stage3: { ms: number; bytes: number; downtimeMs: number };
  totalMs: number;
  /** ms from the start of the checkpoint until it was durable (fsynced and renamed). */
  durableMs: number;
  /** Downtime QEMU itself reports (query-migrate `downtime`). */
  qemuDowntimeMs?: number;
  bytesReceived: number;
  bytesStored: number;
  /**
   * TCG only: pages whose final version QEMU 7.2 did not send (its TCG dirty tracking misses
   * writes through hot TLB entries) and that tlc took from the stopped guest's RAM instead.
   */
  tcgFixup?: { pages: number; ms: number };
  /** Live mode: what the time-bound controller did. */
  control?: ControlReport;
}

export interface ControlReport {
  deadlineMs: number;
  /** Highest vCPU throttle QEMU applied, percent. */
  maxThrottlePct: number;
  /** Set when the controller forced the switchover before QEMU converged on its own. */
  forcedSwitchover?: { atMs: number; reason: string; expectedDowntimeMs: number };
  /** Whether the VM ran again before the deadline. */
  metDeadline: boolean;
}

export interface Manifest {
  magic: typeof MANIFEST_MAGIC;
  formatVersion: [number, number];
  id: string;
  createdAt: string;
  mode: CheckpointMode;
  vm: VmSpec;
  qemuVersion: string;
  machineType: string;
  pageSize: number;
  ramSection: { sectionId: number; instanceId: number; versionId: number };
  blocks: ManifestBlock[];
  configSha256: string;
  device: { file: string; bytes: number; sha256: string; sections: number; runstate?: string };
  metrics: StageMetrics;
  /**
   * Whether the VM was running when the checkpoint was taken. A stop-mode stream records the
   * VM as paused (tlc stopped it to save it); restore resumes it when this is true.
   */
  vmWasRunning: boolean;
  /** Workload progress the guest reported just before the checkpoint, for humans and tests. */
  guestHeartbeatSeqBefore?: number;
  checksum?: string;
}

function canonicalBody(m: Manifest): string {
  const { checksum: _ignored, ...body } = m;
  return JSON.stringify(body);
}

export function sha256Hex(data: Uint8Array | string): string {
  return createHash('sha256').update(data).digest('hex');
}

export function sealManifest(m: Manifest): string {
  const sealed: Manifest = { ...m, checksum: sha256Hex(canonicalBody(m)) };
  return JSON.stringify(sealed, null, 2) + '\n';
}

/** Parses and checks a manifest; refuses a newer major format naming the one it supports. */
export function openManifest(text: string, where: string): Manifest {
  let m: Manifest;
  try {
    m = JSON.parse(text) as Manifest;
  } catch {
    throw new TlcError('E_CORRUPT', `${where}: manifest is not valid JSON`);
  }
  if (m?.magic !== MANIFEST_MAGIC || !Array.isArray(m.formatVersion)) {
    throw new TlcError('E_CORRUPT', `${where}: not a tlc checkpoint manifest`);
  }
  const [major] = m.formatVersion;
  if (major !== MANIFEST_FORMAT_MAJOR) {
    throw new TlcError(
      'E_CORRUPT',
      `${where}: checkpoint format ${m.formatVersion.join('.')} is not supported (this tlc reads ${MANIFEST_FORMAT_MAJOR}.x)`,
    );
  }
  if (m.checksum !== sha256Hex(canonicalBody(m))) {
    throw new TlcError(
      'E_CORRUPT',
      `${where}: manifest checksum mismatch (the file was modified or damaged)`,
    );
  }
  return m;
}
