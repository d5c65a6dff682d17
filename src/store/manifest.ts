import { createHash } from 'node:crypto';
import path from 'node:path';
import { TlcError } from '../core/errors.js';
import type { VmSpec } from '../vm/spec.js';
import { type ManifestSignature, signManifest } from './sign.js';

/**
 * A checkpoint directory, published atomically by renaming `.tmp-<id>` to `<id>`:
 *
 * | file              | holds                                                                   |
 * |-------------------|-------------------------------------------------------------------------|
 * | manifest.json     | this manifest: magic, format version, checksum over the rest of the JSON, optional HMAC signature |
 * | config.bin        | the stream's configuration section, verbatim (machine type, capabilities) |
 * | block-<n>.img     | RAM block n as a raw image at its own offsets; sparse where the guest has zeros. Large blocks (ram0) are mapped by lazy restore |
 * | block-<n>.img.sums | `TLCSUMS1`, be32 chunk size, be32 count, then count x 32-byte SHA-256 of each chunk (all-zero hash for an all-zero chunk) |
 * | block-<n>.img.hashes | per-page xxh64 of the block's whole content (page-hash.ts), format 1.2 |
 * | block-<n>.img.delta | changed pages as XOR deltas against the parent's (delta-file.ts), format 1.2 |
 * | device.bin        | device state: every section after RAM, EOF and the VM description, verbatim |
 *
 * An incremental checkpoint (format 1.2, `parent` set) stores in `block-<n>.img` only the pages
 * whose hash differs from the parent's (holes elsewhere); its hashes file describes the whole
 * block, so a zero hash where the parent's is not says "this page is zero now". Its sums cover the
 * file as stored (holes read as zeros).
 *
 * A manifest is hostile input (it may come from shared storage): `openManifest` (schema.ts)
 * validates all of it before anything uses it, and only the file names above are accepted.
 */
export const MANIFEST_MAGIC = 'tlc-checkpoint';
export const MANIFEST_FILE = 'manifest.json';
export const CONFIG_FILE = 'config.bin';
export const DEVICE_FILE = 'device.bin';
export const SUMS_MAGIC = 'TLCSUMS1';
export const SUMS_CHUNK_BYTES = 1024 * 1024;
/** Target page size of every stream tlc reads (x86). */
export const PAGE_SIZE = 4096;
/** Largest RAM block a manifest may describe. */
export const MAX_BLOCK_BYTES = 2 ** 40;

/**
 * Format policy. `formatVersion` is `[major, minor]`.
 *
 * - **Major** must equal `MANIFEST_FORMAT_MAJOR`. Any other major, older or newer, is refused with
 *   a message naming the version this tlc reads: a major bump means old readers would misread it.
 * - **Minor** bumps only add optional fields, which older readers may ignore. So a manifest with a
 *   newer minor is accepted: its known fields are validated as usual and fields this tlc does not
 *   know are ignored (they stay covered by the checksum and the signature). A manifest of this
 *   minor or an older one must not hold unknown fields: one that does is refused as damaged.
 *   (The VM spec inside and the metrics accept extra keys at every version: they are copied from
 *   elsewhere and grow on their own.)
 *
 * History: 1.0 first format; 1.1 adds the optional `signature`; 1.2 adds incremental checkpoints:
 * `parent`, `storedBytes` and per block `hashesFile`, `hashesSha256`, `storedPages`, `delta*`.
 */
export const MANIFEST_FORMAT_MAJOR = 1;
export const MANIFEST_FORMAT_MINOR = 2;

/** How a manifest of format `[major, minor]` is read; throws E_CORRUPT for an unsupported one. */
export function formatSupport(version: readonly [number, number], where: string): 'known' | 'newer-minor' {
  const [major, minor] = version;
  if (major !== MANIFEST_FORMAT_MAJOR) {
    throw new TlcError(
      'E_CORRUPT',
      `${where}: checkpoint format ${major}.${minor} is not supported (this tlc reads ${MANIFEST_FORMAT_MAJOR}.x)`,
    );
  }
  return minor > MANIFEST_FORMAT_MINOR ? 'newer-minor' : 'known';
}

/**
 * The only file names a manifest may name: tlc's own, no directories, no `..`. The block index is
 * the block's position in `blocks` (checked by the schema), so two blocks never share a file.
 */
export const IMAGE_FILE_RE = /^block-(0|[1-9][0-9]{0,3})\.img$/;
export const SUMS_FILE_RE = /^block-(0|[1-9][0-9]{0,3})\.img\.sums$/;
export const HASHES_FILE_RE = /^block-(0|[1-9][0-9]{0,3})\.img\.hashes$/;
export const DELTA_FILE_RE = /^block-(0|[1-9][0-9]{0,3})\.img\.delta$/;

/** A disk layer: `disk<disk index>-<layer index>.qcow2`. */
export const DISK_LAYER_RE = /^disk(0|[1-9][0-9]?)-(0|[1-9])\.qcow2$/;

export function diskLayerFileName(disk: number, layer: number): string {
  return `disk${disk}-${layer}.qcow2`;
}

export function imageFileName(index: number): string {
  return `block-${index}.img`;
}

export function sumsFileName(index: number): string {
  return `${imageFileName(index)}.sums`;
}

export function hashesFileName(index: number): string {
  return `${imageFileName(index)}.hashes`;
}

export function deltaFileName(index: number): string {
  return `${imageFileName(index)}.delta`;
}

export function isTlcFileName(name: string): boolean {
  return (
    name === DEVICE_FILE ||
    name === CONFIG_FILE ||
    IMAGE_FILE_RE.test(name) ||
    SUMS_FILE_RE.test(name) ||
    HASHES_FILE_RE.test(name) ||
    DELTA_FILE_RE.test(name) ||
    DISK_LAYER_RE.test(name)
  );
}

/** `dir/name` for one of tlc's own file names; refuses anything else (a manifest is hostile input). */
export function checkpointFilePath(dir: string, name: string): string {
  if (!isTlcFileName(name)) {
    throw new TlcError('E_CORRUPT', `${dir}: "${name}" is not a tlc checkpoint file name`);
  }
  return path.join(dir, name);
}

export type CheckpointMode = 'live' | 'cow' | 'stop';

export interface ManifestBlock {
  name: string;
  usedLength: number;
  /** Image file inside the checkpoint directory: `block-<index>.img`. */
  file: string;
  /** `block-<index>.img.sums`. */
  sumsFile: string;
  /** SHA-256 of the sums file, so a damaged sums file is caught too. */
  sumsSha256: string;
  /** Pages that hold data (not all-zero) at checkpoint time. */
  dataPages: number;
  /** `block-<index>.img.hashes` (format 1.2): per-page hashes of the whole block. */
  hashesFile?: string;
  hashesSha256?: string;
  /** Pages this checkpoint's image holds (changed since the parent; all data pages when full). */
  storedPages?: number;
  /**
   * Sub-page deltas (delta-file.ts): changed pages stored as their XOR with the parent's page,
   * run-length encoded, in `block-<index>.img.delta` (a hole in the image there).
   */
  deltaFile?: string;
  deltaSha256?: string;
  deltaBytes?: number;
  deltaPages?: number;
}

/** One qcow2 file of a disk's state, owned by the checkpoint that wrote it. */
export interface DiskLayer {
  /** `disk<d>-<l>.qcow2` in this checkpoint's directory. */
  file: string;
  /** Size of the file, and its SHA-256 at publish time. */
  bytes: number;
  sha256: string;
  /** Name in the layer's qcow2 header of the layer below it (checked before QEMU opens it). */
  backing?: string;
}

/**
 * A VM disk in a checkpoint. Its state is a chain of qcow2 layers: this checkpoint's layers
 * (bottom to top), over `parent`'s chain when the copy was incremental.
 */
export interface ManifestDisk {
  /** virtio-blk device id and format node name, as the VM had them. */
  device: string;
  node: string;
  /** An adopted QEMU's image path: a restore finds the disk in its command line by it. */
  path?: string;
  /** Format of the VM's own image, and its size as the guest sees it. */
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** False for a disk tlc did not capture (read-only, or `--allow-inconsistent-disks`). */
  captured: boolean;
  /** Why a disk was not captured. */
  reason?: string;
  layers: DiskLayer[];
  /** The checkpoint whose top layer this checkpoint's bottom layer is backed by. */
  parent?: { checkpoint: string; file: string };
  /** Dirty bitmap left in the VM's QEMU recording writes since this checkpoint (for the next). */
  bitmap?: string;
  /** Guest data this checkpoint copied (the changed clusters when incremental). */
  copiedBytes: number;
}

export interface StageMetrics {
  /** From the start of the clock until QEMU's migration is active. */
  setupMs: number;
  /** QEMU's own setup-time: from its `migrate` until active. */
  qemuSetupMs?: number;
  /**
   * Faulting in the page table before QEMU started sending: written by tlc versions that had one
   * (their clock started after it); tlc no longer has a warm-up.
   */
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
  /** Extra pause the disk step added (ms the VM stayed stopped for it), and bytes it copied. */
  disk?: { pauseMs: number; copiedBytes: number; copyMs: number };
}

export interface ControlReport {
  deadlineMs: number;
  /** Highest vCPU throttle QEMU applied, percent. */
  maxThrottlePct: number;
  /** Downtime the controller aimed for at the end: the preferred one, or stop-and-save if less. */
  plannedDowntimeMs?: number;
  /** Its estimate of what stopping the VM and saving all its data would have cost, ms. */
  stopAndSaveMs?: number;
  /** Set when the controller forced the switchover before QEMU converged on its own. */
  forcedSwitchover?: { atMs: number; reason: string; expectedDowntimeMs: number };
  /** Whether the VM ran again before the deadline. */
  metDeadline: boolean;
  /** Why not, when it did not: the deadline was impossible, or an estimate was wrong. */
  missedBecause?: string;
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
  /**
   * Format 1.2: the checkpoint whose RAM this one's builds on. Pages not stored here are the
   * parent's (see the file table above); absent for a full checkpoint.
   */
  parent?: string;
  /** Format 1.2: bytes this checkpoint's own files take (allocated), whatever its parent holds. */
  storedBytes?: number;
  /** The VM's disks (absent in checkpoints of VMs without disks and before format 1.1). */
  disks?: ManifestDisk[];
  metrics: StageMetrics;
  /**
   * Whether the VM was running when the checkpoint was taken. A stop-mode stream records the
   * VM as paused (tlc stopped it to save it); restore resumes it when this is true.
   */
  vmWasRunning: boolean;
  /** Workload progress the guest reported just before the checkpoint, for humans and tests. */
  guestHeartbeatSeqBefore?: number;
  /** HMAC over the body (format 1.1); see sign.ts. Authenticity, where `checksum` is integrity only. */
  signature?: ManifestSignature;
  checksum?: string;
}

/** What `checksum` covers: the JSON of everything else, in the order written (signature included). */
export function canonicalBody(m: Manifest): string {
  const { checksum: _ignored, ...body } = m;
  return JSON.stringify(body);
}

export function sha256Hex(data: Uint8Array | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * The manifest file's text. The plain SHA-256 `checksum` is an integrity check only (anyone who
 * can write the store can recompute it). With `key`, the manifest is also signed (HMAC, see
 * sign.ts) and the signature replaces any earlier one. Without `key`, a `signature` already in `m`
 * is kept as it is: resealing an edited signed manifest without the key leaves a MAC that no longer
 * matches, which `checkSignature` refuses.
 */
export function sealManifest(m: Manifest, key?: Buffer): string {
  const { checksum: _old, ...body } = m;
  const signed: Manifest = key ? { ...body, signature: signManifest(body, key) } : body;
  const sealed: Manifest = { ...signed, checksum: sha256Hex(canonicalBody(signed)) };
  return JSON.stringify(sealed, null, 2) + '\n';
}
