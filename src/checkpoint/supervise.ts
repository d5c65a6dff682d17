import { setTimeout as sleep } from 'node:timers/promises';
import { CheckpointError } from '../core/errors.js';
import type { Monitor } from '../qmp/monitor.js';
import type { MigrationParameters } from '../qmp/types.js';
import type { CheckpointMode, ControlReport } from '../store/manifest.js';
import {
  type ControllerConfig,
  type ControllerState,
  INITIAL_STATE,
  type Plan,
  decide,
} from './controller.js';
import type { ControlSample } from './control-trace.js';
import { MigrationObserver } from './migration-observer.js';
import type { CheckpointReceiver } from './receiver.js';
import type { StageMarks } from './stages.js';
import type { CheckpointProgress } from './take.js';

/** The controller's period; also how often progress is sampled. */
export const TICK_MS = 100;

/** QEMU applies a throttle when dirtying exceeds this share of sending in two periods running. */
const THROTTLE_TRIGGER_PCT = 50;
/** Pass lines are printed at most this often (QEMU syncs every iteration under a heavy writer). */
const PASS_REPORT_MS = 500;

/**
 * Auto-converge is on in live mode with the trigger armed from the start, but may throttle only 1%
 * until the controller raises the cap. QEMU 7.2 evaluates the trigger once per dirty-rate period
 * (at least a second) and throttles after two periods over it: armed late, a throttle lands 2-3 s
 * after it was allowed (seen: at 4.8 s of a 6 s deadline). Armed early, the cap the controller
 * sets after the first period is applied at the second.
 */
export const NO_THROTTLE_YET: MigrationParameters = {
  'throttle-trigger-threshold': THROTTLE_TRIGGER_PCT,
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
  /** Guest RAM size, bytes. */
  ramBytes: number;
  onProgress?: (p: CheckpointProgress) => void;
  onStage: (line: string) => void;
  /** Stops supervising once aborted; the caller unwinds. */
  signal?: AbortSignal;
  /** Receives one sample per tick (see control-trace.ts). */
  trace?: ControlSample[];
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
  let reportedPass = 0;
  let reportedAt = -PASS_REPORT_MS;
  let maxThrottle = 0;
  const observer = new MigrationObserver(ctx.ramBytes);
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
    const throttlePct = info['cpu-throttle-percentage'] ?? 0;
    maxThrottle = Math.max(maxThrottle, throttlePct);
    const remainingBytes = info.ram?.remaining ?? 0;
    const sample: ControlSample = {
      t: Math.round(t * 10) / 10,
      status: info.status ?? '',
      remaining: remainingBytes,
      normal: info.ram?.normal ?? 0,
      duplicate: info.ram?.duplicate ?? 0,
      received: bytes,
      dirtyPagesRate: info.ram?.['dirty-pages-rate'] ?? 0,
      throttlePct,
      syncs: info.ram?.['dirty-sync-count'] ?? 0,
      mbps: info.ram?.mbps ?? 0,
      stopped: Boolean(marks.stopped),
    };
    ctx.trace?.push(sample);
    const m = observer.observe(sample);
    const transferBps = observer.sendBps;
    const dirtyBps = m.dirtyBps;
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
      sample.plan = roundPlan(decision.plan);
      const params: MigrationParameters = {};
      if (decision.throttleCapPct !== undefined) {
        params['cpu-throttle-initial'] = Math.max(1, decision.throttleCapPct);
        params['cpu-throttle-increment'] = Math.max(1, decision.throttleCapPct);
        params['max-cpu-throttle'] = Math.max(1, decision.throttleCapPct);
        params['throttle-trigger-threshold'] = THROTTLE_TRIGGER_PCT;
        ctx.onStage(
          `throttle allowed up to ${decision.throttleCapPct}% (QEMU applies it at its next dirty-rate period): ` +
            `guest dirties ${(dirtyBps / MiB).toFixed(0)} MiB/s, tlc receives ${(transferBps / MiB).toFixed(0)} MiB/s, ` +
            `projected end ${fmtMs(decision.plan.finishMs)} of ${ctx.controller.deadlineMs} ms`,
        );
      }
      if (decision.downtimeLimitMs !== undefined) params['downtime-limit'] = decision.downtimeLimitMs;
      if (Object.keys(params).length > 0) sample.action = JSON.stringify(params);
      if (decision.switchover && report) {
        report.forcedSwitchover = {
          atMs: Math.round(t),
          reason: decision.switchover.reason,
          expectedDowntimeMs: Math.round(decision.switchover.expectedDowntimeMs),
        };
        ctx.onStage(`switchover forced at ${Math.round(t)} ms: ${decision.switchover.reason}`);
      }
      if (report) {
        report.plannedDowntimeMs = Math.round(decision.plan.allowedMs);
        report.stopAndSaveMs = Math.round(decision.plan.stopAndSaveMs);
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

function fmtMs(ms: number): string {
  return Number.isFinite(ms) ? `~${Math.round(ms)} ms` : 'never (does not converge)';
}

function roundPlan(p: Plan): Record<string, number | null> {
  return Object.fromEntries(
    Object.entries(p).map(([k, v]) => [k, Number.isFinite(v) ? Math.round(v as number) : null]),
  );
}
