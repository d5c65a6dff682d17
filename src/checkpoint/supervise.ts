import { setTimeout as sleep } from 'node:timers/promises';
import { CheckpointError } from '../core/errors.js';
import type { Monitor } from '../qmp/monitor.js';
import type { MigrationParameters } from '../qmp/types.js';
import type { CheckpointMode, ControlReport } from '../store/manifest.js';
import {
  type ControllerConfig,
  type ControllerState,
  INITIAL_STATE,
  decide,
  expectedDowntimeMs,
} from './controller.js';
import type { CheckpointReceiver } from './receiver.js';
import type { StageMarks } from './stages.js';
import type { CheckpointProgress } from './take.js';

/** The controller's period; also how often progress is sampled. */
export const TICK_MS = 100;
const PAGE_SIZE = 4096;
/** Weight of the newest sample in the transfer-rate average. */
const RATE_SMOOTHING = 0.5;
/** Samples before the rate is trusted: the first ones see QEMU's ramp-up. */
const RATE_WARMUP_SAMPLES = 3;
/** Until this many samples, plan with at least the nominal rate (QEMU's slow start). */
const RAMP_UP_SAMPLES = 5;

/**
 * Auto-converge is on in live mode, but may throttle only 1% until the controller raises the
 * cap: QEMU throttles a guest only when it dirties memory faster than it sends it (trigger 100%).
 */
/** Once throttling is allowed, QEMU applies it when dirtying exceeds this share of sending. */
const THROTTLE_TRIGGER_PCT = 50;
/** Pass lines are printed at most this often (QEMU syncs every iteration under a heavy writer). */
const PASS_REPORT_MS = 500;

export const NO_THROTTLE_YET: MigrationParameters = {
  'throttle-trigger-threshold': 100,
  'cpu-throttle-initial': 1,
  'cpu-throttle-increment': 1,
  'max-cpu-throttle': 1,
};

export interface SuperviseContext {
  qmp: Monitor;
  receiver: CheckpointReceiver;
  marks: StageMarks;
  now: () => number;
  mode: CheckpointMode;
  timeoutMs: number;
  controller?: ControllerConfig;
  /** Rate assumed while the first pass is still running. */
  nominalBps: number;
  onProgress?: (p: CheckpointProgress) => void;
  onStage: (line: string) => void;
  /** Stops supervising once aborted; the caller unwinds. */
  signal?: AbortSignal;
}

const MiB = 1024 * 1024;

/**
 * Watches QEMU until the whole stream is in: samples transfer and dirty rates every tick, applies
 * the controller's decisions, reports progress, and enforces the timeout.
 */
export async function superviseMigration(ctx: SuperviseContext): Promise<ControlReport | undefined> {
  const { qmp, receiver, marks, now } = ctx;
  let streamDone = false;
  let streamError: unknown;
  receiver.streamDone.then(
    () => (streamDone = true),
    (err: unknown) => (streamError = err),
  );
  let state: ControllerState = INITIAL_STATE;
  let lastBytes = receiver.bytesReceived;
  let lastT = now();
  let transferBps = 0;
  let samples = 0;
  let lastPages = 0;
  let reportedPass = 0;
  let reportedAt = -PASS_REPORT_MS;
  let maxThrottle = 0;
  const report: ControlReport | undefined = ctx.controller
    ? { deadlineMs: ctx.controller.deadlineMs, maxThrottlePct: 0, metDeadline: false }
    : undefined;
  while (!streamDone) {
    if (streamError) throw streamError;
    if (ctx.signal?.aborted) throw ctx.signal.reason;
    const info = await qmp.execute('query-migrate');
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new CheckpointError(
        `QEMU reports migration ${info.status}: ${info['error-desc'] ?? 'no reason given'}`,
      );
    }
    const t = now();
    const bytes = receiver.bytesReceived;
    // During the first pass QEMU walks pages never sent yet, mostly zero and sent as tiny
    // records: its progress is pages scanned, not bytes. After it, bytes are the measure.
    const pages = (info.ram?.normal ?? 0) + (info.ram?.duplicate ?? 0);
    if (t > lastT && marks.active) {
      samples++;
      const byteRate = ((bytes - lastBytes) * 1000) / (t - lastT);
      const pageRate = ((pages - lastPages) * PAGE_SIZE * 1000) / (t - lastT);
      const sample = marks.firstPassDone ? byteRate : Math.max(byteRate, pageRate);
      transferBps = transferBps === 0 ? sample : RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * transferBps;
    }
    lastBytes = bytes;
    lastPages = pages;
    lastT = t;
    const throttlePct = info['cpu-throttle-percentage'] ?? 0;
    maxThrottle = Math.max(maxThrottle, throttlePct);
    const dirtyBps = (info.ram?.['dirty-pages-rate'] ?? 0) * PAGE_SIZE;
    const remainingBytes = info.ram?.remaining ?? 0;
    ctx.onProgress?.({
      stage: !marks.active
        ? 'setup'
        : marks.stopped && ctx.mode === 'live'
          ? 'stage3'
          : marks.firstPassDone
            ? 'stage2'
            : 'stage1',
      elapsedMs: t,
      bytesReceived: bytes,
      passes: marks.passes,
      dirtyPagesRate: info.ram?.['dirty-pages-rate'] ?? 0,
      remainingBytes,
      throttlePct,
    });
    if (ctx.controller && marks.active && !marks.stopped && info.status === 'active') {
      // QEMU's first pass starts slowly (a few hundred ms of ramp-up): for its first half second,
      // plan with at least the nominal rate, or the ramp-up would look like a hopeless deadline.
      const measured = samples >= RATE_WARMUP_SAMPLES ? transferBps : 0;
      const trusted =
        marks.firstPassDone || samples >= RAMP_UP_SAMPLES ? measured : Math.max(measured, ctx.nominalBps);
      const m = { elapsedMs: t, remainingBytes, transferBps: trusted, dirtyBps, throttlePct };
      if (marks.passes > reportedPass && marks.passes >= 2 && t - reportedAt >= PASS_REPORT_MS) {
        reportedPass = marks.passes;
        reportedAt = t;
        ctx.onStage(
          `pass ${marks.passes}: sending ${(transferBps / MiB).toFixed(0)} MiB/s, guest dirtying ${(dirtyBps / MiB).toFixed(0)} MiB/s, ` +
            `${(remainingBytes / MiB).toFixed(1)} MiB to go, throttle ${throttlePct}%`,
        );
      }
      const { state: next, decision } = decide(ctx.controller, state, m);
      state = next;
      const params: MigrationParameters = {};
      if (decision.throttleCapPct !== undefined) {
        params['cpu-throttle-initial'] = decision.throttleCapPct;
        params['cpu-throttle-increment'] = decision.throttleCapPct;
        params['max-cpu-throttle'] = decision.throttleCapPct;
        params['throttle-trigger-threshold'] = THROTTLE_TRIGGER_PCT;
        ctx.onStage(
          `throttle allowed up to ${decision.throttleCapPct}%: guest dirties ${(dirtyBps / MiB).toFixed(0)} MiB/s, ` +
            `tlc receives ${(transferBps / MiB).toFixed(0)} MiB/s`,
        );
      }
      if (decision.downtimeLimitMs !== undefined) params['downtime-limit'] = decision.downtimeLimitMs;
      if (decision.switchover && report) {
        report.forcedSwitchover = {
          atMs: Math.round(t),
          reason: decision.switchover.reason,
          expectedDowntimeMs: Math.round(decision.switchover.expectedDowntimeMs),
        };
        ctx.onStage(
          `switchover forced at ${Math.round(t)} ms: ${decision.switchover.reason}; expected downtime ~${Math.round(expectedDowntimeMs(ctx.controller, m))} ms`,
        );
      }
      if (Object.keys(params).length > 0) await qmp.execute('migrate-set-parameters', params);
    }
    if (t > ctx.timeoutMs)
      throw new CheckpointError(`Checkpoint did not finish within ${ctx.timeoutMs} ms; cancelled`);
    await Promise.race([receiver.streamDone.catch(() => undefined), sleep(TICK_MS)]);
  }
  if (streamError) throw streamError;
  if (report) {
    report.maxThrottlePct = maxThrottle;
    report.metDeadline = (marks.resumed?.t ?? now()) <= report.deadlineMs;
  }
  return report;
}
