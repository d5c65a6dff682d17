import fs from 'node:fs';
import path from 'node:path';
import { TlcError } from '../core/errors.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import { type ManifestDisk, checkpointFilePath } from '../store/manifest.js';
import type { CheckpointStore, StoredCheckpoint } from '../store/store.js';
import { createQcow2 } from '../vm/qemu-img.js';
import type { VmDisk } from '../vm/spec.js';

export interface RestoredDisk {
  disk: VmDisk;
  /** An adopted VM's original image path, which its command line names. */
  original?: string;
  /** The checkpoint layer the new overlay is backed by; undefined when not captured. */
  backedBy?: string;
}

/**
 * Gives a restored VM disks whose content is exactly the checkpoint's: a new writable qcow2
 * overlay per disk, in `targetDir`, over the checkpoint's layers, which stay unchanged (QEMU
 * opens backing files read-only), so every restore starts from identical disks. The layer chain
 * is checked first: every checkpoint it runs through must exist, and every layer's qcow2 header
 * must name exactly the layer the manifest says, since QEMU follows those names.
 */
export async function restoreDisks(opts: {
  ckpt: StoredCheckpoint;
  store: CheckpointStore;
  targetDir: string;
  vmName: string;
  log: (line: string) => void;
  /** Checks a parent checkpoint the chain runs through (signature, files) or throws. */
  verifyParent: (parent: StoredCheckpoint) => void;
}): Promise<RestoredDisk[]> {
  const { ckpt, log } = opts;
  // An adopted VM's disks are the ones its checkpoint found over QMP, known by image path.
  const wanted: (VmDisk & { original?: string })[] =
    ckpt.manifest.vm.adoptedArgv || ckpt.manifest.vm.libvirt
      ? (ckpt.manifest.disks ?? [])
          .filter((d) => d.captured && d.path)
          .map((d) => ({
            path: d.path as string,
            format: d.format,
            node: d.node,
            device: d.device,
            original: d.path as string,
          }))
      : (ckpt.manifest.vm.disks ?? []);
  if (wanted.length === 0) return [];
  fs.mkdirSync(opts.targetDir, { recursive: true, mode: PRIVATE_DIR_MODE });
  const stamp = new Date().toISOString().replace(/[-:.]/g, '').replace('T', '-').slice(0, 18);
  const out: RestoredDisk[] = [];
  for (const disk of wanted) {
    const saved = ckpt.manifest.disks?.find((d) => d.node === disk.node);
    if (!saved || !saved.captured) {
      if (!disk.readOnly) {
        throw new TlcError(
          'E_RESTORE',
          `${ckpt.id} did not capture disk ${disk.device} (${saved?.reason ?? 'taken before tlc saved disks'}); ` +
            'its state at the checkpoint is unknown, so tlc does not start a VM on it',
        );
      }
      out.push({ disk });
      continue;
    }
    const top = checkChain(opts.store, ckpt, saved, opts.verifyParent);
    const label = disk.original ? `disk${out.length}` : disk.device;
    const overlay = path.join(opts.targetDir, `${opts.vmName}-${label}-${stamp}.qcow2`);
    if (fs.existsSync(overlay)) throw new TlcError('E_RESTORE', `${overlay} already exists`);
    await createQcow2(overlay, saved.virtualSize, top);
    fs.chmodSync(overlay, 0o600);
    log(`disk ${disk.device}: ${overlay} (new overlay over ${path.relative(opts.store.dir, top)})`);
    out.push({
      disk: { path: overlay, format: 'qcow2', node: disk.node, device: disk.device },
      backedBy: top,
      ...(disk.original ? { original: disk.original } : {}),
    });
  }
  return out;
}

/**
 * Walks a disk's layers down to its first full copy and returns the top layer's path. Refuses a
 * missing parent checkpoint or a layer whose header names another backing file.
 */
function checkChain(
  store: CheckpointStore,
  ckpt: StoredCheckpoint,
  disk: ManifestDisk,
  verifyParent: (parent: StoredCheckpoint) => void,
): string {
  let current: StoredCheckpoint = ckpt;
  let entry: ManifestDisk = disk;
  const top = checkpointFilePath(ckpt.dir, disk.layers.at(-1)?.file ?? '');
  for (let depth = 0; ; depth++) {
    if (depth > 1000)
      throw new TlcError('E_CORRUPT', `${ckpt.id}: disk ${disk.device} has a cyclic layer chain`);
    entry.layers.forEach((layer, i) => {
      const file = checkpointFilePath(current.dir, layer.file);
      const below =
        i > 0
          ? entry.layers[i - 1]?.file
          : entry.parent
            ? path.join('..', entry.parent.checkpoint, entry.parent.file)
            : undefined;
      const header = qcow2Backing(file);
      if (header !== below || layer.backing !== below) {
        throw new TlcError(
          'E_CORRUPT',
          `${current.id}: disk layer ${layer.file} names backing file "${header ?? '(none)'}", expected "${below ?? '(none)'}"`,
        );
      }
    });
    if (!entry.parent) return top;
    const parentId = entry.parent.checkpoint;
    let parent: StoredCheckpoint;
    try {
      parent = store.resolve(parentId);
    } catch {
      throw new TlcError(
        'E_CORRUPT',
        `${ckpt.id}: disk ${disk.device} builds on checkpoint ${parentId}, which is missing from ${store.dir}`,
      );
    }
    if (parent.id !== parentId)
      throw new TlcError('E_CORRUPT', `${ckpt.id}: parent ${parentId} is not a checkpoint id`);
    verifyParent(parent);
    const next = parent.manifest.disks?.find((d) => d.node === entry.node && d.captured);
    if (!next || next.layers.at(-1)?.file !== entry.parent.file) {
      throw new TlcError(
        'E_CORRUPT',
        `${ckpt.id}: checkpoint ${parentId} has no layer ${entry.parent.file} for disk ${disk.device}`,
      );
    }
    current = parent;
    entry = next;
  }
}

const QCOW2_MAGIC = 0x514649fb;
/** Incompatible feature bit 2: guest data lives in an external file named by the header. */
const EXTERNAL_DATA_FILE = 4n;

/** The backing file name a qcow2 header holds (undefined: none). Refuses anything but qcow2. */
export function qcow2Backing(file: string): string | undefined {
  const fd = fs.openSync(file, 'r');
  try {
    const header = Buffer.alloc(104);
    fs.readSync(fd, header, 0, header.length, 0);
    if (header.readUInt32BE(0) !== QCOW2_MAGIC)
      throw new TlcError('E_CORRUPT', `${file} is not a qcow2 image`);
    const version = header.readUInt32BE(4);
    if (version >= 3 && (header.readBigUInt64BE(72) & EXTERNAL_DATA_FILE) !== 0n) {
      throw new TlcError('E_CORRUPT', `${file} keeps its data in an external file: not a tlc disk layer`);
    }
    const offset = Number(header.readBigUInt64BE(8));
    const size = header.readUInt32BE(16);
    if (offset === 0 || size === 0) return undefined;
    if (size > 1023) throw new TlcError('E_CORRUPT', `${file}: backing file name of ${size} bytes`);
    const name = Buffer.alloc(size);
    fs.readSync(fd, name, 0, size, offset);
    return name.toString('utf8');
  } finally {
    fs.closeSync(fd);
  }
}
