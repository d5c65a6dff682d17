import fs from 'node:fs';
import path from 'node:path';
import { CheckpointError, QmpError } from '../core/errors.js';
import { hashFile } from '../core/fsutil.js';
import type { Monitor } from '../qmp/monitor.js';
import type { QmpEvent, TransactionAction } from '../qmp/types.js';
import { type DiskLayer, type ManifestDisk, diskLayerFileName } from '../store/manifest.js';
import type { StoredCheckpoint } from '../store/store.js';
import { createQcow2 } from '../vm/qemu-img.js';
import type { VmDisk, VmSpec } from '../vm/spec.js';

/**
 * What a checkpoint may leave in the VM's QEMU, by name, so that a tlc killed mid-copy can be
 * cleaned up by the next tlc command (see checkpoint/owed.ts).
 */
export interface DiskLeftovers {
  jobs: string[];
  nodes: string[];
  bitmaps: { node: string; name: string }[];
}

/** Makes a target file openable by QEMU and returns the name QEMU opens it by. */
export type TargetOpener = (file: string) => Promise<string>;

interface Capturable {
  index: number;
  disk: VmDisk;
  /** A disk of an adopted QEMU: a restore finds it in the command line by its image path. */
  adopted: boolean;
  virtualSize: number;
  /** Previous checkpoint of this disk whose bitmap still records every write since it. */
  parent?: { checkpoint: string; dir: string; file: string; bitmap: string };
}

interface Round {
  layer: number;
  /** Bitmap each disk's backup reads (undefined: full copy), and the one started in its place. */
  from: (string | undefined)[];
  to: string[];
  targets: string[];
  files: string[];
  jobs: string[];
  /** Bytes each job copied (the dirty or allocated data, not the virtual size). */
  copied: Map<string, number>;
  done: Map<string, QmpEvent>;
  listener?: (ev: QmpEvent) => void;
  wake?: () => void;
  started: boolean;
}

/**
 * Captures a VM's writable disks at the instant its memory state is captured, as qcow2 layers in
 * the checkpoint's directory. Each round is one QMP `transaction` (a new dirty bitmap plus a
 * `blockdev-backup` per disk): the backup's copy-before-write filter makes the copy exactly the
 * state at that instant while the guest writes on. The first round of a disk copies all of it;
 * later rounds copy the clusters the previous round's bitmap saw change, into a layer backed by
 * the previous layer (of this checkpoint, or of the previous checkpoint).
 */
export class DiskCapture {
  private rounds: Round[] = [];
  private readonly created: DiskLeftovers = { jobs: [], nodes: [], bitmaps: [] };
  private readonly pendingJobs = new Set<string>();

  private constructor(
    private readonly qmp: Monitor,
    private readonly checkpointId: string,
    private readonly disks: Capturable[],
    private readonly skipped: ManifestDisk[],
    private readonly openTarget: TargetOpener | undefined,
  ) {}

  /**
   * Decides what each disk needs: refuses writable disks tlc cannot capture (unless allowed,
   * loudly), finds the parent checkpoint whose bitmap is still in QEMU for incremental copies.
   */
  static async plan(opts: {
    qmp: Monitor;
    spec: VmSpec;
    checkpointId: string;
    previous: StoredCheckpoint[];
    allowInconsistent: boolean;
    /** For a QEMU that cannot open tlc's private files (libvirt's): hands it an open descriptor. */
    openTarget?: TargetOpener;
  }): Promise<DiskCapture> {
    const { qmp, spec } = opts;
    const nodes = await qmp.execute('query-named-block-nodes', { flat: true });
    const byName = new Map(nodes.map((n) => [n['node-name'], n]));
    const devices = await qmp.execute('query-block');
    // An adopted QEMU's disks are whatever it has now, found over QMP (node names such as
    // `#block123` are QEMU's and last as long as the process).
    const managed = spec.adoptedArgv || spec.libvirt ? discoverDisks(devices, byName) : (spec.disks ?? []);
    const known = new Set(managed.map((d) => d.node));
    const skipped: ManifestDisk[] = [];
    for (const dev of devices) {
      const ins = dev.inserted;
      if (!ins || ins.ro || known.has(ins['node-name'])) continue;
      const name = dev.qdev ?? dev.device;
      if (!opts.allowInconsistent) {
        throw new CheckpointError(
          `Disk ${name} (${ins.file}) is writable but not a disk tlc manages: tlc cannot save it at the checkpoint's instant. ` +
            'Pass --allow-inconsistent-disks to checkpoint without it (a restore then reopens it as it is by then)',
        );
      }
      skipped.push(notCaptured(name, ins['node-name'], 'raw', 0, 'not managed by tlc; allowed inconsistent'));
    }
    const disks: Capturable[] = [];
    for (const [index, disk] of managed.entries()) {
      const node = byName.get(disk.node);
      if (!node) throw new CheckpointError(`Disk ${disk.device}: QEMU has no block node ${disk.node}`);
      const virtualSize = node.image['virtual-size'];
      if (disk.readOnly) {
        skipped.push(
          notCaptured(
            disk.device,
            disk.node,
            disk.format,
            virtualSize,
            'read-only: the image itself is its state',
          ),
        );
        continue;
      }
      const bitmaps = new Set((node['dirty-bitmaps'] ?? []).map((b) => b.name));
      let parent: Capturable['parent'];
      for (const prev of [...opts.previous].reverse()) {
        const d = prev.manifest.disks?.find((x) => x.node === disk.node && x.captured);
        const top = d?.layers.at(-1);
        if (!d?.bitmap || !top || !bitmaps.has(d.bitmap)) continue;
        if (!fs.existsSync(path.join(prev.dir, top.file)) || d.virtualSize !== virtualSize) continue;
        parent = { checkpoint: prev.id, dir: prev.dir, file: top.file, bitmap: d.bitmap };
        break;
      }
      disks.push({
        index,
        disk,
        virtualSize,
        adopted: Boolean(spec.adoptedArgv || spec.libvirt),
        ...(parent ? { parent } : {}),
      });
    }
    return new DiskCapture(qmp, opts.checkpointId, disks, skipped, opts.openTarget);
  }

  /** Whether any disk is captured (the modes then add their disk step). */
  get active(): boolean {
    return this.disks.length > 0;
  }

  /** Every name this checkpoint may create in QEMU, known before anything is created. */
  leftovers(maxLayers: number): DiskLeftovers {
    const out: DiskLeftovers = { jobs: [], nodes: [], bitmaps: [] };
    for (const c of this.disks) {
      for (let layer = 0; layer < maxLayers; layer++) {
        out.jobs.push(this.jobName(c, layer));
        out.nodes.push(this.targetNode(c, layer));
        out.bitmaps.push({ node: c.disk.node, name: this.bitmapName(layer) });
      }
    }
    return out;
  }

  private jobName(c: Capturable, layer: number): string {
    return `tlc-job-${c.index}-${layer}`;
  }

  private targetNode(c: Capturable, layer: number): string {
    return `tlc-tgt-${c.index}-${layer}`;
  }

  /** Round `layer`'s bitmap: it records writes from that round's instant on. */
  private bitmapName(layer: number): string {
    return `tlc-${this.checkpointId}${layer === 0 ? '' : `.${layer}`}`;
  }

  /**
   * Creates the round's target images and opens them in QEMU: all the slow work, done while the
   * guest runs, so the pause holds only the transaction.
   */
  async prepare(staging: string): Promise<void> {
    const layer = this.rounds.length;
    const prev = this.rounds.at(-1);
    const round: Round = {
      layer,
      from: [],
      to: [],
      targets: [],
      files: [],
      jobs: [],
      copied: new Map(),
      done: new Map(),
      started: false,
    };
    for (const c of this.disks) {
      const file = diskLayerFileName(c.index, layer);
      const full = path.join(staging, file);
      // The header names the layer below relative to this file, so a store can be moved whole.
      const backing = prev
        ? diskLayerFileName(c.index, layer - 1)
        : c.parent
          ? path.join('..', c.parent.checkpoint, c.parent.file)
          : undefined;
      await createQcow2(full, c.virtualSize, backing);
      const node = this.targetNode(c, layer);
      const filename = this.openTarget ? await this.openTarget(full) : full;
      await this.qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': node,
        file: { driver: 'file', filename },
        // The backup writes every cluster it copies; the layers below are never opened here.
        backing: null,
        'detect-zeroes': 'unmap',
        discard: 'unmap',
      });
      this.created.nodes.push(node);
      round.from.push(prev ? prev.to[this.disks.indexOf(c)] : c.parent?.bitmap);
      round.to.push(this.bitmapName(layer));
      round.targets.push(node);
      round.files.push(file);
      round.jobs.push(this.jobName(c, layer));
    }
    this.rounds.push(round);
  }

  /**
   * The instant: one transaction that starts a bitmap and a point-in-time backup per disk.
   * `speed` (bytes/s) keeps the copy from competing with the migration's start (cow mode).
   */
  async start(speed?: number): Promise<void> {
    const round = this.rounds.at(-1);
    if (!round || round.started) throw new Error('DiskCapture.start without prepare');
    round.listener = (ev) => {
      if (ev.event !== 'BLOCK_JOB_COMPLETED' && ev.event !== 'BLOCK_JOB_ERROR') return;
      const job = String(ev.data?.device ?? '');
      if (round.jobs.includes(job) && ev.event === 'BLOCK_JOB_COMPLETED') {
        round.done.set(job, ev);
        round.wake?.();
      }
    };
    this.qmp.on('event', round.listener);
    const actions: TransactionAction[] = [];
    this.disks.forEach((c, i) => {
      const from = round.from[i];
      actions.push({
        type: 'block-dirty-bitmap-add',
        data: { node: c.disk.node, name: round.to[i] as string },
      });
      actions.push({
        type: 'blockdev-backup',
        data: {
          'job-id': round.jobs[i] as string,
          device: c.disk.node,
          target: round.targets[i] as string,
          ...(from ? { sync: 'bitmap', bitmap: from, 'bitmap-mode': 'never' } : { sync: 'full' }),
          ...(speed ? { speed } : {}),
          'auto-finalize': true,
          'auto-dismiss': true,
        },
      });
    });
    await this.qmp.execute('transaction', { actions });
    round.started = true;
    this.disks.forEach((c, i) => {
      this.created.bitmaps.push({ node: c.disk.node, name: round.to[i] as string });
      this.pendingJobs.add(round.jobs[i] as string);
    });
  }

  /** Lifts a `speed` given to start(). */
  async unthrottle(): Promise<void> {
    for (const job of this.rounds.at(-1)?.jobs ?? []) {
      if (this.pendingJobs.has(job) && !this.rounds.at(-1)?.done.has(job))
        await this.qmp.execute('block-job-set-speed', { device: job, speed: 0 }).catch(() => undefined);
    }
  }

  /** Waits until the newest round's copies are complete; a job error fails the checkpoint. */
  async wait(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const round = this.rounds.at(-1);
    if (!round?.started) return;
    const deadline = Date.now() + timeoutMs;
    let checks = 0;
    while (round.done.size < round.jobs.length) {
      if (signal?.aborted) throw signal.reason;
      if (Date.now() > deadline) throw new CheckpointError(`Disk copy did not finish within ${timeoutMs} ms`);
      // Woken by the completion event at once (this wait may sit inside the VM's pause); every
      // tenth tick the job list is asked too, in case an event was lost.
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 20);
        round.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      round.wake = undefined;
      if (++checks % 10 !== 0 || round.done.size === round.jobs.length) continue;
      const running = new Set((await this.qmp.execute('query-block-jobs')).map((j) => j.device));
      const lost = round.jobs.find((job) => !round.done.has(job) && !running.has(job));
      if (lost && !round.done.has(lost))
        throw new CheckpointError(`Disk copy ${lost} ended without completing`);
    }
    for (const [job, ev] of round.done) {
      const error = ev.data?.error;
      if (typeof error === 'string') throw new CheckpointError(`Disk copy ${job} failed: ${error}`);
      round.copied.set(job, Number(ev.data?.len ?? 0));
      this.pendingJobs.delete(job);
    }
    if (round.listener) this.qmp.off('event', round.listener);
  }

  /**
   * Closes the newest round's complete targets so their files are final, and drops the bitmap
   * that only bridged two rounds of this checkpoint. Outside any pause: nothing here is urgent.
   */
  async close(): Promise<void> {
    const round = this.rounds.at(-1);
    if (!round?.started) return;
    for (const node of round.targets) {
      await this.qmp.execute('blockdev-del', { 'node-name': node });
      this.created.nodes = this.created.nodes.filter((n) => n !== node);
    }
    const before = this.rounds.at(-2);
    if (before) await this.removeBitmaps(before);
  }

  private async removeBitmaps(round: Round): Promise<void> {
    for (const [i, c] of this.disks.entries()) {
      const name = round.to[i] as string;
      await this.qmp.execute('block-dirty-bitmap-remove', { node: c.disk.node, name }).catch(() => undefined);
      this.created.bitmaps = this.created.bitmaps.filter((b) => !(b.node === c.disk.node && b.name === name));
    }
  }

  /** Bytes copied so far (all finished rounds). */
  get copiedBytes(): number {
    let sum = 0;
    for (const r of this.rounds) for (const n of r.copied.values()) sum += n;
    return sum;
  }

  /** fsyncs and hashes the layers, and describes every disk for the manifest. */
  describe(staging: string): ManifestDisk[] {
    const out: ManifestDisk[] = [];
    for (const [i, c] of this.disks.entries()) {
      const layers: DiskLayer[] = this.rounds.map((round, r) => {
        const file = round.files[i] as string;
        const { bytes, sha256 } = hashFile(path.join(staging, file), { fsync: true });
        const backing =
          r > 0
            ? (this.rounds[r - 1]?.files[i] as string)
            : c.parent
              ? path.join('..', c.parent.checkpoint, c.parent.file)
              : undefined;
        return { file, bytes, sha256, ...(backing ? { backing } : {}) };
      });
      out.push({
        device: c.disk.device,
        node: c.disk.node,
        ...(c.adopted ? { path: c.disk.path } : {}),
        format: c.disk.format,
        virtualSize: c.virtualSize,
        captured: true,
        layers,
        ...(c.parent ? { parent: { checkpoint: c.parent.checkpoint, file: c.parent.file } } : {}),
        bitmap: this.rounds.at(-1)?.to[i] as string,
        copiedBytes: this.rounds.reduce((sum, r) => sum + (r.copied.get(r.jobs[i] as string) ?? 0), 0),
      });
    }
    return [...out, ...this.skipped];
  }

  /**
   * After publish: the new bitmap now records changes since this checkpoint; the parent's is no
   * longer needed by anyone.
   */
  async committed(): Promise<void> {
    this.created.bitmaps = [];
    for (const c of this.disks) {
      if (!c.parent) continue;
      await this.qmp
        .execute('block-dirty-bitmap-remove', { node: c.disk.node, name: c.parent.bitmap })
        .catch(() => undefined);
    }
  }

  /** Undoes everything this checkpoint created in QEMU: jobs, target nodes, bitmaps. */
  async abort(): Promise<string[]> {
    return removeLeftovers(this.qmp, {
      jobs: [...this.pendingJobs],
      nodes: this.created.nodes,
      bitmaps: this.created.bitmaps,
    });
  }
}

/** Writable qcow2/raw images on local files, as an adopted QEMU has them. */
function discoverDisks(
  devices: {
    device: string;
    qdev?: string;
    inserted?: { 'node-name': string; ro: boolean; file: string; drv: string };
  }[],
  nodes: Map<string, { drv: string; file: string }>,
): VmDisk[] {
  const out: VmDisk[] = [];
  for (const dev of devices) {
    const ins = dev.inserted;
    if (!ins || ins.ro || (ins.drv !== 'qcow2' && ins.drv !== 'raw')) continue;
    if (!path.isAbsolute(ins.file) || !fs.existsSync(ins.file)) continue;
    if (!nodes.has(ins['node-name'])) continue;
    out.push({ path: ins.file, format: ins.drv, node: ins['node-name'], device: dev.qdev ?? dev.device });
  }
  return out;
}

function notCaptured(
  device: string,
  node: string,
  format: 'qcow2' | 'raw',
  virtualSize: number,
  reason: string,
): ManifestDisk {
  return { device, node, format, virtualSize, captured: false, reason, layers: [], copiedBytes: 0 };
}

/**
 * Cancels jobs, closes target nodes and removes bitmaps by name, ignoring the ones that do not
 * exist (a checkpoint killed early created only some). Returns what it removed.
 */
export async function removeLeftovers(qmp: Monitor, left: DiskLeftovers): Promise<string[]> {
  const done: string[] = [];
  const running = new Set((await qmp.execute('query-block-jobs')).map((j) => j.device));
  for (const job of left.jobs) {
    if (!running.has(job)) continue;
    await qmp.execute('block-job-cancel', { device: job, force: true }).catch(() => undefined);
    for (let i = 0; i < 250; i++) {
      const still = (await qmp.execute('query-block-jobs')).some((j) => j.device === job);
      if (!still) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    done.push(`cancelled disk copy ${job}`);
  }
  for (const node of left.nodes) {
    try {
      await qmp.execute('blockdev-del', { 'node-name': node });
      done.push(`closed ${node}`);
    } catch (err) {
      if (!(err instanceof QmpError)) throw err;
    }
  }
  for (const b of left.bitmaps) {
    try {
      await qmp.execute('block-dirty-bitmap-remove', b);
      done.push(`removed bitmap ${b.name}`);
    } catch (err) {
      if (!(err instanceof QmpError)) throw err;
    }
  }
  return done;
}
