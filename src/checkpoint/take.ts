import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CheckpointError, InterruptedError, TlcError, errorText } from '../core/errors.js';
import type { Monitor } from '../qmp/monitor.js';
import type { MigrationInfo, QmpEvent } from '../qmp/types.js';
import {
  type CheckpointMode,
  MANIFEST_FILE,
  MANIFEST_FORMAT_MAJOR,
  MANIFEST_FORMAT_MINOR,
  MANIFEST_MAGIC,
  type ControlReport,
  type Manifest,
  type ManifestDisk,
  sealManifest,
} from '../store/manifest.js';
import { openManifest } from '../store/schema.js';
import { loadSigningKey } from '../store/sign.js';
import { CheckpointStore, type StoredCheckpoint } from '../store/store.js';
import { writeFileAtomic } from '../core/fsutil.js';
import { lastHeartbeatSeq } from '../vm/console.js';
import { GuestRam } from '../vm/guest-ram.js';
import { vmDir } from '../vm/registry.js';
import { modeSupport } from '../vm/memory-layout.js';
import { type VmSpec, qemuArgv, ramBlockOf } from '../vm/spec.js';
import { DiskCapture } from '../disk/capture.js';
import { holdAt, holdsAt } from './hold.js';
import { CheckpointReceiver } from './receiver.js';
import { CheckpointSession, resume } from './session.js';
import { type StageMarks, stageMetrics } from './stages.js';
import { type ControllerConfig, INITIAL_DOWNTIME_LIMIT_MS, defaultDeadlineMs } from './controller.js';
import { learnedRates } from './rate-history.js';
import { type ControlSample, saveControlTrace } from './control-trace.js';
import { NO_THROTTLE_YET, TICK_MS, superviseMigration } from './supervise.js';

/** QEMU's 128 MiB/s default cap makes live checkpoints of busy guests never end; the receiver is local. */
const UNLIMITED_BANDWIDTH = 1024 * 1024 * 1024 * 1024;
const DEFAULT_DOWNTIME_LIMIT_MS = 300;
/** A disk copy that takes longer than this fails the checkpoint (the VM keeps running). */
const DISK_COPY_TIMEOUT_MS = 30 * 60_000;
/** Rate assumed for a default deadline before any checkpoint of the VM measured one. */
const NOMINAL_TRANSFER_BPS = 512 * 1024 * 1024;
/**
 * TCG fix-up cost per MiB of guest RAM when no earlier checkpoint of the VM measured it: 0.1-0.25 ms
 * on a 2-core host beside a CPU hog (1 GiB guest), up to 0.9 ms seen on smaller guests.
 */
const TCG_FIXUP_MS_PER_MIB = 0.5;
/** Device state, the last dirty sync and the `cont` round trip, ms. */
const STOP_OVERHEAD_MS = 30;

export interface CheckpointProgress {
  stage: 'setup' | 'stage1' | 'stage2' | 'stage3' | 'persisting';
  elapsedMs: number;
  bytesReceived: number;
  dirtyPagesRate?: number;
  remainingBytes?: number;
  passes: number;
  throttlePct?: number;
}

export interface CheckpointOptions {
  vm: string;
  /** `auto` measures the guest's dirty rate first and picks live or cow. */
  mode?: CheckpointMode | 'auto';
  store?: CheckpointStore;
  /** Preferred stop time for live mode (QEMU's downtime-limit). */
  maxDowntimeMs?: number;
  /**
   * Live mode: the VM must run again this many ms after the checkpoint started. Default: derived
   * from RAM size and a nominal transfer rate (see `defaultDeadlineMs`).
   */
  deadlineMs?: number;
  /** Cap QEMU's send rate (bytes/s); default unlimited. */
  maxBandwidthBps?: number;
  /** Give up (cancel, VM keeps running) after this long. */
  timeoutMs?: number;
  onProgress?: (p: CheckpointProgress) => void;
  onStage?: (line: string) => void;
  /** Aborting (Ctrl-C) cancels the checkpoint and undoes everything; the VM keeps running. */
  signal?: AbortSignal;
  /**
   * Checkpoint although a writable disk cannot be saved consistently (a disk tlc does not manage);
   * the manifest and `tlc show` say it was not captured.
   */
  allowInconsistentDisks?: boolean;
  /** HMAC key file; default `$TLC_SIGN_KEY`, else the per-user key (created on first use). */
  signKeyFile?: string;
  /** Store every page, not only those changed since the VM's newest checkpoint. */
  full?: boolean;
  /** Changed pages as XOR deltas against the parent's where that halves them (default on). */
  subPageDeltas?: boolean;
}

/**
 * Takes a checkpoint of a running VM: QEMU migrates into tlc's receiver over a private unix
 * socket; the VM is resumed the moment the stream is complete; the checkpoint is published only
 * once every file is fsynced. On failure or interruption (`opts.signal`) the migration is
 * cancelled, the guest resumed, QEMU's migration settings put back, and nothing is published.
 */
export async function takeCheckpoint(opts: CheckpointOptions): Promise<StoredCheckpoint> {
  const store = opts.store ?? new CheckpointStore();
  const stage = opts.onStage ?? (() => undefined);
  // Load (or create) the key first: a bad key file fails before the VM is touched.
  const signing = loadSigningKey({
    ...(opts.signKeyFile ? { keyFile: opts.signKeyFile } : {}),
    create: true,
  });
  if (signing?.created)
    stage(
      `created signing key ${signing.file} (key ${signing.keyId}); keep it to restore signed checkpoints`,
    );
  const session = await CheckpointSession.open(opts.vm, store, opts.signal, stage);
  try {
    return await runCheckpoint(session, opts, stage, signing?.key);
  } catch (err) {
    const reason = err instanceof Error ? err : new Error(String(err));
    const undone = await session.unwind(reason);
    const what = undone.length > 0 ? `; ${undone.join(', ')}` : '';
    if (err instanceof InterruptedError)
      throw new InterruptedError(err.signal, `checkpoint of ${opts.vm} interrupted by ${err.signal}${what}`);
    if (err instanceof TlcError) {
      if (what) err.message += what;
      throw err;
    }
    throw new CheckpointError(`Checkpoint of "${opts.vm}" failed: ${errorText(err)}${what}`, { cause: err });
  } finally {
    await session.releaseFiles().catch(() => undefined);
    session.dispose();
  }
}

async function runCheckpoint(
  session: CheckpointSession,
  opts: CheckpointOptions,
  stage: (line: string) => void,
  signKey: Buffer | undefined,
): Promise<StoredCheckpoint> {
  const { qmp, record, id } = session;
  const status = session.status;
  let mode: CheckpointMode;
  if (opts.mode === 'auto') {
    const choice = await session.guard(
      chooseMode(qmp, status.running, opts.maxBandwidthBps ?? NOMINAL_TRANSFER_BPS),
    );
    mode = choice.mode;
    stage(`mode auto: ${choice.reason}`);
  } else {
    mode = opts.mode ?? 'live';
  }
  const support = modeSupport(record.spec.accel, record.spec.memory, record.process);
  if (!support[mode].ok) {
    const fallback = (['cow', 'stop'] as const).find((m) => support[m].ok) ?? 'stop';
    if (opts.mode !== 'auto') {
      throw new CheckpointError(
        `--mode ${mode} cannot work for VM "${opts.vm}": ${support[mode].why}. Use --mode ${fallback}`,
      );
    }
    stage(`mode auto: ${mode} cannot work (${support[mode].why}); taking ${fallback}`);
    mode = fallback;
  }
  session.mode = mode;
  if (status.status !== 'running' && status.status !== 'paused') {
    throw new CheckpointError(
      `VM "${opts.vm}" is ${status.status}; a checkpoint needs a running or paused VM`,
    );
  }
  const wasRunning = session.wasRunning;
  const seqBefore = record.paths.consoleLog ? lastHeartbeatSeq(record.paths.consoleLog) : undefined;
  // QEMU 7.2's TCG dirty tracking loses writes made through TLB entries that stay hot across a
  // bitmap sync, so a TCG pre-copy stream can hold stale pages. tlc compares against the stopped
  // guest's own RAM before resuming it, which needs RAM it can read.
  const guestRam =
    mode === 'live' && record.spec.accel === 'tcg' && record.process
      ? GuestRam.open(record.process, record.spec)
      : undefined;
  session.guestRam = guestRam;
  if (mode === 'live' && record.spec.accel === 'tcg' && !guestRam) {
    throw new CheckpointError(
      `Live mode on a TCG VM needs guest RAM tlc can read (a memfd or file memory backend); "${opts.vm}" has anonymous RAM. ` +
        'Use --mode cow (consistent on TCG) or --mode stop',
    );
  }
  const staging = session.staging();
  let tcgFixup: { pages: number; ms: number } | undefined;

  // This VM's checkpoints, oldest first (reading the store parses every manifest in it): the disk
  // chains, the parent of an incremental checkpoint and the controller's learned rates use them.
  const previous = session.store.list().filter((c) => c.manifest.vm.name === record.spec.name);
  // Disks are saved at the instant memory is: plan (and refuse what cannot be made consistent)
  // before anything in QEMU changes, and record what a killed tlc would leave behind.
  const disks = await DiskCapture.plan({
    qmp,
    spec: record.spec,
    checkpointId: id,
    previous,
    allowInconsistent: Boolean(opts.allowInconsistentDisks),
    ...(record.libvirt ? { openTarget: (file: string) => session.passFile(file) } : {}),
  });
  session.disks = disks;
  await session.owe(disks.active ? disks.leftovers(2) : undefined);
  const diskTiming = { pauseMs: 0, copyMs: 0, startedAt: 0 };
  if (disks.active) {
    await disks.prepare(staging);
    if (mode === 'live') {
      // Pre-copy for disks: a full (or incremental) copy while the guest runs; the switchover
      // then copies only what changed since, inside QEMU's pre-switchover pause.
      const started = performance.now();
      await disks.start();
      await session.guard(disks.wait(DISK_COPY_TIMEOUT_MS, opts.signal));
      await disks.close();
      diskTiming.copyMs += performance.now() - started;
      stage(
        `disk pre-copy (guest running): ${(disks.copiedBytes / 2 ** 20).toFixed(1)} MiB in ${diskTiming.copyMs.toFixed(0)} ms`,
      );
      await disks.prepare(staging);
    }
  }
  let switchover: Promise<void> | undefined;
  let unthrottled: Promise<void> | undefined;

  const t0 = performance.now();
  const now = (): number => performance.now() - t0;
  const marks: StageMarks = { mode, passes: 0 };
  let resumed: Promise<void> | undefined;
  const afterStream = async (): Promise<void> => {
    // Crash tests hold here: the stream is complete and (live, stop) the VM is still stopped.
    await holdAt('stream-complete', opts.signal);
    if (guestRam) {
      const started = performance.now();
      const pages = receiver.reconcileRam(ramBlockOf(record.spec), (buf, offset, len) =>
        guestRam.read(buf, offset, len),
      );
      tcgFixup = { pages, ms: performance.now() - started };
    }
    if (wasRunning && mode !== 'cow') {
      await resume(qmp);
      marks.resumed ??= { t: now() };
    } else if (!wasRunning && mode !== 'cow') {
      // A migration leaves a paused guest `postmigrate`, from which QEMU refuses any further
      // migration (the next checkpoint, libvirt's own save): back to plain `paused`, which takes
      // a `cont` and an immediate `stop` (the guest runs for that moment).
      const started = performance.now();
      await resume(qmp);
      await qmp.execute('stop');
      stage(
        `VM was paused: restored from QEMU's postmigrate state to paused (ran ${(performance.now() - started).toFixed(1)} ms)`,
      );
    }
  };
  // Incremental by default: only what changed since the VM's newest checkpoint is stored.
  const newest = previous.at(-1);
  const parent = opts.full ? undefined : newest;
  const receiver = new CheckpointReceiver(
    staging,
    {
      onStreamComplete: (bytes) => {
        marks.streamDone = { t: now(), bytes };
        resumed = afterStream();
        resumed.catch(() => undefined);
      },
      onConnection: (socket) => {
        session.guardStream(socket);
        if (holdsAt('streaming')) {
          // Crash tests hold here: QEMU is connected and streaming (and guarded, for cow), blocked
          // on a socket tlc no longer reads. The MIGRATION event may come before the connection.
          receiver.pauseReading();
          void holdAt('streaming', opts.signal).catch(() => undefined);
        }
      },
    },
    {
      maxRamBytes: (record.spec.memMiB + 512) * 1024 * 1024,
      neverCut: mode === 'cow',
      ...(parent ? { parent } : {}),
      // The VM's own directory: host-local, whatever the store is, and removed with the VM.
      scratch: { dir: path.join(vmDir(record.spec.name), 'scratch'), id, ...(newest ? { newest } : {}) },
      ...(opts.subPageDeltas === false ? { subPageDeltas: false } : {}),
    },
  );
  session.receiver = receiver;

  const onEvent = (ev: QmpEvent): void => {
    const bytes = receiver.bytesReceived;
    if (ev.event === 'MIGRATION' && ev.data?.status === 'active' && !marks.active) {
      marks.active = { t: now(), bytes };
      stage(`setup: ${now().toFixed(0)} ms`);
    } else if (ev.event === 'MIGRATION' && ev.data?.status === 'pre-switchover' && !switchover) {
      // QEMU stopped the guest and waits: the disks' final copy happens at this very instant.
      switchover = (async () => {
        const started = performance.now();
        await disks.start();
        await disks.wait(DISK_COPY_TIMEOUT_MS, opts.signal);
        await qmp.execute('migrate-continue', { state: 'pre-switchover' });
        diskTiming.pauseMs = performance.now() - started;
        diskTiming.copyMs += diskTiming.pauseMs;
        await disks.close();
      })();
      switchover.catch((err: unknown) => receiver.abort(err instanceof Error ? err : new Error(String(err))));
    } else if (ev.event === 'MIGRATION_PASS') {
      marks.passes = Number(ev.data?.pass ?? marks.passes);
      if (marks.passes === 2 && mode === 'live') {
        marks.firstPassDone = { t: now(), bytes };
        stage(
          `stage 1 (full memory pass): ${(now() - (marks.active?.t ?? 0)).toFixed(0)} ms, ${(bytes / 2 ** 20).toFixed(1)} MiB`,
        );
      }
    } else if (ev.event === 'STOP' && marks.stopTs === undefined) {
      marks.stopped ??= { t: now(), bytes };
      marks.stopTs = eventTime(ev);
    } else if (ev.event === 'RESUME' && mode === 'cow' && !wasRunning) {
      // QEMU 7.2's background snapshot starts the guest whatever its state was: a VM its user
      // had paused is paused again at once (it ran for the moments in between).
      void qmp.execute('stop').catch(() => undefined);
    } else if (ev.event === 'RESUME' && marks.stopTs !== undefined && marks.resumeTs === undefined) {
      marks.resumed ??= { t: now() };
      marks.resumeTs = eventTime(ev);
      if (mode === 'cow' && disks.active) {
        // The copy started at a crawl so it would not slow the snapshot's start; now it may run.
        unthrottled = holdAt('disk-copy', opts.signal).then(() => disks.unthrottle());
        unthrottled.catch(() => undefined);
      }
    }
  };
  qmp.on('event', onEvent);

  const maxDowntimeMs = opts.maxDowntimeMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
  const ramBytes = record.spec.memMiB * 1024 * 1024;
  const deadlineMs =
    opts.deadlineMs ?? defaultDeadlineMs(ramBytes, opts.maxBandwidthBps ?? NOMINAL_TRANSFER_BPS);
  const learned = learnedRates(previous);
  const controller: ControllerConfig | undefined =
    mode === 'live'
      ? {
          deadlineMs,
          maxDowntimeMs,
          fixedDowntimeMs:
            STOP_OVERHEAD_MS +
            (guestRam ? record.spec.memMiB * (learned.fixupMsPerMiB ?? TCG_FIXUP_MS_PER_MIB) : 0),
          tickMs: TICK_MS,
          // QEMU sends the stopped stage without its bandwidth cap.
          stopRateBps: learned.stopRateBps ?? NOMINAL_TRANSFER_BPS,
        }
      : undefined;
  if (controller) {
    stage(
      `deadline ${deadlineMs} ms${opts.deadlineMs === undefined ? ' (default: 3 passes over RAM at a nominal rate)' : ''}, preferred downtime ${maxDowntimeMs} ms; ` +
        `planning with a stopped-stage rate of ${(controller.stopRateBps / 2 ** 20).toFixed(0)} MiB/s${learned.stopRateBps ? ' (earlier checkpoints)' : ' (nominal)'} ` +
        `and a fixed stop cost of ${controller.fixedDowntimeMs.toFixed(0)} ms`,
    );
  }
  try {
    const migrateUri = await session.guard(session.migrationTarget(receiver));
    session.throwIfInterrupted();
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'background-snapshot', state: mode === 'cow' },
        { capability: 'xbzrle', state: false },
        // Live mode: the controller lets QEMU's auto-converge throttle vCPUs, up to a cap it sets.
        { capability: 'auto-converge', state: mode === 'live' },
        { capability: 'postcopy-ram', state: false },
        { capability: 'multifd', state: false },
        { capability: 'return-path', state: false },
        // Live mode with disks: QEMU waits, guest stopped, for tlc to copy the disks' last changes.
        { capability: 'pause-before-switchover', state: mode === 'live' && disks.active },
      ],
    });
    await qmp.execute('migrate-set-parameters', {
      'max-bandwidth': opts.maxBandwidthBps ?? UNLIMITED_BANDWIDTH,
      // Live mode: QEMU switches over only when the controller allows it (see controller.ts).
      'downtime-limit': controller ? INITIAL_DOWNTIME_LIMIT_MS : Math.round(maxDowntimeMs),
      ...NO_THROTTLE_YET,
    });
    if (mode === 'stop' && wasRunning) {
      await qmp.execute('stop');
      marks.stopped ??= { t: now(), bytes: 0 };
      await session.guard(holdAt('stopped', opts.signal));
    }
    if (disks.active && mode !== 'live') {
      // stop: the guest is stopped. cow: stop it for the instant; the background snapshot
      // resumes it. The copy runs on after that, point-in-time through copy-before-write.
      if (mode === 'cow' && wasRunning) await qmp.execute('stop');
      const started = performance.now();
      diskTiming.startedAt = started;
      await disks.start(mode === 'cow' ? 1 : undefined);
      diskTiming.pauseMs = performance.now() - started;
    }
    session.throwIfInterrupted();
    await qmp.execute('migrate', { uri: migrateUri });
    session.migrating = true;
    const trace: ControlSample[] = [];
    const control = await session.guard(
      superviseMigration({
        qmp,
        receiver,
        marks,
        now,
        mode,
        timeoutMs: opts.timeoutMs ?? 10 * 60_000,
        ramBytes,
        ...(controller ? { controller, trace } : {}),
        ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
        onStage: stage,
      }),
    );
    if (resumed) await session.guard(resumed);
    if (switchover) await session.guard(switchover);
    session.migrating = false;
    if (control) {
      control.metDeadline = (marks.resumed?.t ?? now()) <= control.deadlineMs;
      if (!control.metDeadline) control.missedBecause = missedBecause(control, marks, tcgFixup?.ms);
    }
    if (controller) saveControlTrace({ ramBytes, deadlineMs, maxDowntimeMs, samples: trace });
    const info = await session.guard(finalInfo(qmp));
    if (mode === 'cow' && marks.resumeTs === undefined) {
      // background-snapshot restarts the VM itself; wait briefly for its RESUME event.
      await session.guard(qmp.waitEvent('RESUME', 1000).catch(() => undefined));
    }
    // The guest runs again and the migration is over: QEMU gets its own settings back now.
    await session.settle();
    opts.onProgress?.({
      stage: 'persisting',
      elapsedMs: now(),
      bytesReceived: receiver.bytesReceived,
      passes: marks.passes,
    });
    if (disks.active && mode !== 'live') {
      if (unthrottled) await session.guard(unthrottled);
      else await disks.unthrottle();
      await session.guard(disks.wait(DISK_COPY_TIMEOUT_MS, opts.signal));
      diskTiming.copyMs = performance.now() - diskTiming.startedAt;
      await disks.close();
    }
    await session.guard(holdAt('persist', opts.signal));
    const received = await session.guard(receiver.persist());
    // Hashes every disk layer (after an fsync): once.
    const savedDisks = disks.describe(staging);
    assertRestorable(record.spec, received.blocks, savedDisks);
    for (const d of savedDisks.filter((x) => !x.captured && !x.reason?.startsWith('read-only')))
      stage(`WARNING: disk ${d.device} NOT CAPTURED (${d.reason}); a restore reopens it as it is by then`);
    const manifest: Manifest = {
      magic: MANIFEST_MAGIC,
      formatVersion: [MANIFEST_FORMAT_MAJOR, MANIFEST_FORMAT_MINOR],
      id,
      createdAt: new Date().toISOString(),
      mode,
      vm: record.spec,
      qemuVersion: record.spec.qemu.version,
      machineType: received.machineType,
      pageSize: 4096,
      ramSection: received.ramSection,
      blocks: received.blocks,
      ...(savedDisks.length > 0 ? { disks: savedDisks } : {}),
      configSha256: received.configSha256,
      device: received.device,
      vmWasRunning: wasRunning,
      ...(received.parent ? { parent: received.parent } : {}),
      storedBytes: received.bytesStored,
      metrics: {
        ...stageMetrics(marks, received.bytesStored, info),
        // Data files are fsynced here; the returned copy below says when the rename made it all durable.
        durableMs: now(),
        ...(disks.active
          ? {
              disk: {
                pauseMs: Math.round(diskTiming.pauseMs * 10) / 10,
                copiedBytes: disks.copiedBytes,
                copyMs: Math.round(diskTiming.copyMs),
              },
            }
          : {}),
        ...(tcgFixup ? { tcgFixup } : {}),
        ...(control ? { control } : {}),
      },
      ...(seqBefore !== undefined ? { guestHeartbeatSeqBefore: seqBefore } : {}),
    };
    const sealed = sealManifest(manifest, signKey);
    // What tlc cannot read back must never be published: the manifest passes its own reader first.
    openManifest(sealed, `checkpoint ${id} (not published)`);
    writeFileAtomic(path.join(staging, MANIFEST_FILE), sealed, 0o600);
    await session.guard(holdAt('publish', opts.signal));
    session.throwIfInterrupted();
    const dir = session.publish();
    // The new bitmaps now record changes since this checkpoint; the parent's are done.
    await disks.committed().catch(() => undefined);
    manifest.metrics.durableMs = now();
    const x = manifest.metrics;
    stage(
      `stage 3 (VM stopped): ${(x.stage3.bytes / 2 ** 20).toFixed(1)} MiB, downtime ${x.stage3.downtimeMs.toFixed(1)} ms`,
    );
    stage(`durable after ${manifest.metrics.durableMs.toFixed(0)} ms: ${dir}`);
    return { id, dir, manifest };
  } finally {
    qmp.off('event', onEvent);
  }
}

/** Why a live checkpoint ended after its deadline, in terms of what the controller knew. */
function missedBecause(c: ControlReport, marks: StageMarks, fixupMs: number | undefined): string {
  const stopAt = marks.stopped?.t;
  const resumed = marks.resumed?.t ?? 0;
  const forced = c.forcedSwitchover;
  if (forced && forced.atMs + forced.expectedDowntimeMs > c.deadlineMs)
    return `impossible: when forced at ${forced.atMs} ms, stopping already needed ~${forced.expectedDowntimeMs} ms (the first pass alone outran the deadline on this host)`;
  const parts = [`VM ran again at ${Math.round(resumed)} ms`];
  if (forced)
    parts.push(`forced at ${forced.atMs} ms expecting ~${forced.expectedDowntimeMs} ms of downtime`);
  if (stopAt !== undefined) parts.push(`QEMU stopped the VM at ${Math.round(stopAt)} ms`);
  if (fixupMs !== undefined) parts.push(`TCG fix-up ${Math.round(fixupMs)} ms`);
  return `${parts.join(', ')}: the stop took longer than estimated`;
}

function eventTime(ev: QmpEvent): number {
  return ev.timestamp ? ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000 : Date.now();
}

/** QEMU fills `downtime` a moment after `completed` (reference pitfall 12): re-query briefly. */
async function finalInfo(
  qmp: Monitor,
): Promise<{ downtimeMs?: number; downtimeBytes?: number; setupMs?: number }> {
  let info: MigrationInfo = {};
  for (let i = 0; i < 20; i++) {
    info = await qmp.execute('query-migrate');
    if (info.status === 'completed' && (info.downtime ?? 0) > 0) break;
    await sleep(25);
  }
  return {
    ...(info.downtime !== undefined ? { downtimeMs: info.downtime } : {}),
    ...(info.ram?.['downtime-bytes'] !== undefined ? { downtimeBytes: info.ram['downtime-bytes'] } : {}),
    ...(info['setup-time'] !== undefined ? { setupMs: info['setup-time'] } : {}),
  };
}

/** A dirty rate above this share of the send rate makes pre-copy depend on heavy throttling. */
const AUTO_COW_DIRTY_SHARE = 0.5;

/**
 * `--mode auto`: samples the guest's dirty rate for a second (QEMU's page-sampling
 * calc-dirty-rate; the dirty-bitmap mode crashes QEMU 7.2 under TCG) and takes a background
 * snapshot when pre-copy could only finish by throttling the guest hard or by a long stop.
 */
async function chooseMode(
  qmp: Monitor,
  running: boolean,
  sendBps: number,
): Promise<{ mode: CheckpointMode; reason: string }> {
  if (!running) return { mode: 'live', reason: 'VM is paused: nothing dirties memory, live pre-copy' };
  try {
    await qmp.execute('calc-dirty-rate', { 'calc-time': 1 });
    for (let i = 0; i < 40; i++) {
      await sleep(100);
      const r = await qmp.execute('query-dirty-rate');
      if (r.status !== 'measured' || r['dirty-rate'] === undefined) continue;
      const dirtyBps = r['dirty-rate'] * 1024 * 1024;
      const rates = `guest dirties ${r['dirty-rate']} MiB/s, pre-copy sends ~${Math.round(sendBps / 2 ** 20)} MiB/s`;
      return dirtyBps > sendBps * AUTO_COW_DIRTY_SHARE
        ? { mode: 'cow', reason: `${rates}: background snapshot (no throttling, an instant of downtime)` }
        : { mode: 'live', reason: `${rates}: live pre-copy converges` };
    }
  } catch (err) {
    return {
      mode: 'live',
      reason: `dirty rate unavailable (${errorText(err)}): live pre-copy with the deadline controller`,
    };
  }
  return {
    mode: 'live',
    reason: 'dirty rate not measured in time: live pre-copy with the deadline controller',
  };
}

/**
 * No checkpoint tlc could never restore is published: main RAM must be in the stream under the
 * name a restore supplies it by, and the VM's command line must be one tlc can start again.
 */
function assertRestorable(
  spec: VmSpec,
  blocks: readonly { name: string; usedLength: number }[],
  disks: readonly ManifestDisk[],
): void {
  const ramBlock = ramBlockOf(spec);
  const ram = blocks.find((b) => b.name === ramBlock);
  if (!ram || ram.usedLength !== spec.memMiB * 2 ** 20) {
    throw new CheckpointError(
      `This checkpoint could not be restored: the stream's RAM blocks (${blocks.map((b) => b.name).join(', ')}) ` +
        `have no "${ramBlock}" of ${spec.memMiB} MiB; nothing was published`,
    );
  }
  try {
    qemuArgv(
      { ...spec, memory: { kind: 'file', path: '/restore-check', share: false } },
      {
        qmpSocket: '/restore-check/qmp.sock',
        consoleLog: '/restore-check/console.log',
        pidFile: '/restore-check/qemu.pid',
        incoming: 'unix:/restore-check/in.sock',
        keepAdoptedDisks: disks.some((d) => !d.captured),
        diskOverlays: Object.fromEntries(
          disks.filter((d) => d.captured && d.path).map((d) => [d.path, '/restore-check/disk.qcow2']),
        ),
      },
    );
  } catch (err) {
    throw new CheckpointError(
      `This checkpoint could not be restored (${errorText(err)}); nothing was published`,
      {
        cause: err,
      },
    );
  }
}
