import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import {
  type ControllerConfig,
  type Measurement,
  INITIAL_STATE,
  MAX_DOWNTIME_LIMIT_MS,
  decide,
  defaultDeadlineMs,
  downtimeLimitFor,
  plan,
  remainingDataBytes,
} from './controller.js';
import type { ControlSample } from './control-trace.js';
import { type GuestAndHost, type SimResult, guestAndHostFromTrace, simulatePrecopy } from './precopy-sim.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

const TRACE_DIR = fileURLToPath(new URL('../../../src/checkpoint/fixtures/control-traces/', import.meta.url));

/** A recorded trace: what `TLC_CONTROL_TRACE` saved, plus what the checkpoint's manifest measured. */
interface TraceFixture {
  recorded: { workload: string; guestMiB: number; hostLoad: string; machine: string; note: string };
  deadlineMs: number;
  maxDowntimeMs: number;
  /** The stopped stage's rate and fix-up, from the manifest of the recorded checkpoint. */
  stopRateBps: number;
  fixedStopMs: number;
  samples: ControlSample[];
}

function config(
  deadlineMs: number,
  stopRateBps: number,
  fixedDowntimeMs: number,
  maxDowntimeMs = 300,
): ControllerConfig {
  return { deadlineMs, maxDowntimeMs, fixedDowntimeMs, tickMs: 100, stopRateBps };
}

/**
 * The rule, checked on a simulated run: the VM runs again by the deadline; unforced, it stopped no
 * longer than the plan allows (the preferred downtime, or stop-and-save if less; at least the
 * fixed cost plus the smallest set the controller lets QEMU stop with); forced, no longer than
 * stop-and-save; and a forced switchover happened only where continuing would have missed or come
 * within a second of the deadline (the controller cannot see convergence coming, and keeps that
 * much for QEMU's switch latency under a throttle).
 */
const HINDSIGHT_SLACK_MS = 1000;
function ruleProblems(cfg: ControllerConfig, g: GuestAndHost, r: SimResult): string[] {
  const problems: string[] = [];
  const p = r.plan;
  const say = `end ${r.endMs.toFixed(0)} ms, downtime ${r.downtimeMs.toFixed(0)} ms, forced ${r.forced}, throttle ${r.maxThrottlePct}%`;
  if (!(r.endMs <= cfg.deadlineMs)) problems.push(`missed the ${cfg.deadlineMs} ms deadline: ${say}`);
  if (!p) return [...problems, 'no plan'];
  if (r.forced) {
    if (r.downtimeMs > p.stopAndSaveMs * 1.05)
      problems.push(`forced downtime above stop-and-save ~${p.stopAndSaveMs.toFixed(0)} ms: ${say}`);
    const unforced = simulatePrecopy(cfg, g, { ignoreForce: true, limitMs: cfg.deadlineMs + 5000 });
    if (unforced.endMs <= cfg.deadlineMs - HINDSIGHT_SLACK_MS && unforced.downtimeMs <= p.allowedMs)
      problems.push(
        `forced although continuing would have ended at ${unforced.endMs.toFixed(0)} ms with ${unforced.downtimeMs.toFixed(0)} ms downtime: ${say}`,
      );
  } else {
    const floorMs = g.fixedStopMs + 0.25 * cfg.maxDowntimeMs;
    if (r.downtimeMs > Math.max(p.allowedMs, floorMs) * 1.05)
      problems.push(`unforced downtime above the planned ~${p.allowedMs.toFixed(0)} ms: ${say}`);
  }
  return problems;
}

function synthetic(over: Partial<GuestAndHost>): GuestAndHost {
  return {
    ramBytes: GiB,
    sendBps: () => 800 * MiB,
    scanBps: () => 1600 * MiB,
    dataShare: 0.9,
    dirtyBps: () => 0,
    stopRateBps: 1200 * MiB,
    fixedStopMs: 150,
    stopLatencyMs: (pct) => 100 + 7 * pct,
    ...over,
  };
}

describe('time-bound controller on simulated guests', () => {
  it('lets a light writer converge on its own, unthrottled, within the preferred downtime', () => {
    const g = synthetic({ dirtyBps: () => 40 * MiB });
    const cfg = config(6000, g.stopRateBps, g.fixedStopMs);
    const r = simulatePrecopy(cfg, g);
    assert.deepEqual(ruleProblems(cfg, g, r), []);
    assert.equal(r.forced, false);
    assert.equal(r.maxThrottlePct, 0);
  });

  it('finishes a first pass slowed by a loaded host (150 MiB/s) before the deadline', () => {
    // 1 GiB of data at 150 MiB/s would take 6.8 s to send while running: only a stop (which sends
    // faster: the vCPU no longer competes) or a throttle meets 6 s.
    const g = synthetic({
      sendBps: () => 150 * MiB,
      scanBps: () => 160 * MiB,
      dataShare: 1,
      dirtyBps: () => 300 * MiB,
    });
    const cfg = config(6000, 512 * MiB, g.fixedStopMs);
    const r = simulatePrecopy(cfg, g);
    assert.deepEqual(ruleProblems(cfg, g, r), []);
  });

  it('survives RAM that is mostly zero in the first pass and then fills', () => {
    // The first pass finds 10% data; meanwhile the guest writes 900 MiB of fresh pages.
    const g = synthetic({
      dataShare: 0.1,
      scanBps: () => 3000 * MiB,
      dirtyBps: (t) => (t < 1500 ? 600 * MiB : 60 * MiB),
    });
    const cfg = config(6000, g.stopRateBps, g.fixedStopMs);
    const r = simulatePrecopy(cfg, g);
    assert.deepEqual(ruleProblems(cfg, g, r), []);
  });

  it('reacts to a dirty rate that jumps mid-checkpoint', () => {
    const g = synthetic({ dirtyBps: (t) => (t < 2000 ? 100 * MiB : 900 * MiB) });
    const cfg = config(6000, g.stopRateBps, g.fixedStopMs);
    const r = simulatePrecopy(cfg, g);
    assert.deepEqual(ruleProblems(cfg, g, r), []);
  });

  it('forces the switchover of a guest that can never converge, in time and no costlier than stop-and-save', () => {
    const g = synthetic({ dirtyBps: () => 2000 * MiB });
    const cfg = config(6000, g.stopRateBps, g.fixedStopMs);
    const r = simulatePrecopy(cfg, g);
    assert.deepEqual(ruleProblems(cfg, g, r), []);
    assert.equal(r.forced, true);
  });
});

describe('time-bound controller on recorded traces', () => {
  const files = readdirSync(TRACE_DIR).filter((f) => f.endsWith('.json'));
  it('has recorded traces to replay', () =>
    assert.ok(files.length >= 3, `only ${files.length} in ${TRACE_DIR}`));
  for (const file of files) {
    const fx = JSON.parse(readFileSync(TRACE_DIR + file, 'utf8')) as TraceFixture;
    it(`${file}: ${fx.recorded.workload}, ${fx.recorded.hostLoad}`, () => {
      const ramBytes = fx.recorded.guestMiB * MiB;
      const g = guestAndHostFromTrace(fx.samples, ramBytes, fx);
      // The controller plans with a nominal stopped-stage rate on a VM's first checkpoint: replay
      // both that and a rate learned from earlier checkpoints (the recorded one).
      for (const stopRate of [512 * MiB, fx.stopRateBps]) {
        const cfg = config(fx.deadlineMs, stopRate, fx.fixedStopMs, fx.maxDowntimeMs);
        const r = simulatePrecopy(cfg, g);
        assert.deepEqual(ruleProblems(cfg, g, r), [], `planning with ${(stopRate / MiB).toFixed(0)} MiB/s`);
      }
    });
  }
});

function measurement(over: Partial<Measurement>): Measurement {
  return {
    elapsedMs: 1000,
    remainingBytes: 100 * MiB,
    dirtiedSinceSyncBytes: 0,
    transferBps: 500 * MiB,
    scanBps: 500 * MiB,
    dirtyBps: 0,
    throttlePct: 0,
    firstPassDone: true,
    dataShare: 1,
    ramBytes: GiB,
    ramDataBytes: GiB,
    qemuBytesPerMs: 0,
    ...over,
  };
}

describe('time-bound controller pieces', () => {
  it('counts only the data share of unscanned first-pass pages, plus what was dirtied since the sync', () => {
    assert.equal(
      remainingDataBytes(measurement({ firstPassDone: false, dataShare: 0.25, remainingBytes: 400 * MiB })),
      100 * MiB,
    );
    assert.equal(
      remainingDataBytes(measurement({ remainingBytes: 100 * MiB, dirtiedSinceSyncBytes: 50 * MiB })),
      150 * MiB,
    );
    assert.equal(
      remainingDataBytes(measurement({ remainingBytes: 900 * MiB, dirtiedSinceSyncBytes: 900 * MiB })),
      GiB,
    );
  });

  it('converts a set into a downtime-limit with the higher of QEMU bandwidth and the stop rate', () => {
    assert.equal(downtimeLimitFor(100 * 1000 * 1000, 1000 * 1000, 500 * 1000), 100);
    assert.equal(downtimeLimitFor(100 * 1000 * 1000, 10 * 1000, 1000 * 1000), 100);
    assert.equal(downtimeLimitFor(1, 1000, 1000), 1);
    assert.equal(downtimeLimitFor(1e15, 1, 1), MAX_DOWNTIME_LIMIT_MS);
  });

  it('aims below stop-and-save when that is cheaper than the preferred downtime', () => {
    const cfg = config(6000, 1000 * MiB, 20, 5000);
    const p = plan(cfg, measurement({ ramDataBytes: 200 * MiB }));
    assert.ok(Math.abs(p.stopAndSaveMs - 220) < 1, `${p.stopAndSaveMs}`);
    assert.equal(p.allowedMs, p.stopAndSaveMs);
  });

  it('forces the switchover only at the last moment a stop still meets the deadline', () => {
    const cfg = config(6000, 1000 * MiB, 100);
    const m = measurement({ remainingBytes: 900 * MiB, dirtyBps: 2000 * MiB });
    assert.equal(decide(cfg, INITIAL_STATE, { ...m, elapsedMs: 1000 }).decision.switchover, undefined);
    const late = decide(cfg, INITIAL_STATE, { ...m, elapsedMs: 4000 });
    assert.ok(late.decision.switchover, 'forced with 2 s left and ~1 s needed');
    assert.equal(late.decision.downtimeLimitMs, MAX_DOWNTIME_LIMIT_MS);
    assert.equal(late.state.switchedOver, true);
  });

  it('allows a throttle as soon as the projection misses the deadline', () => {
    const cfg = config(6000, 1000 * MiB, 100);
    const d = decide(
      cfg,
      INITIAL_STATE,
      measurement({ elapsedMs: 1500, remainingBytes: 700 * MiB, dirtyBps: 450 * MiB }),
    );
    assert.ok((d.decision.throttleCapPct ?? 0) > 0, JSON.stringify(d.decision));
  });

  it('derives a default deadline from RAM size, at least 3 s', () => {
    assert.equal(defaultDeadlineMs(64 * MiB, 512 * MiB), 3000);
    assert.equal(defaultDeadlineMs(GiB, 512 * MiB), 6000);
  });
});
