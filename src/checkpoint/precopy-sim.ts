/**
 * A pre-copy migration simulated tick by tick, with the time-bound controller in the loop: the
 * controller's tests replay what a real guest and host did (a recorded trace) against decisions
 * the controller makes anew. What QEMU 7.2 does is modelled where the controller depends on it:
 * the first pass scans every page (zero pages cost scan time, not bytes); later passes send the
 * pages dirtied since the last sync; QEMU switches over when the set after a sync is below its
 * bandwidth × downtime-limit; auto-converge evaluates dirtying against sending once per period of
 * at least a second, at a sync, and throttles after two periods over the trigger.
 */
import {
  type ControllerConfig,
  type ControllerState,
  type Plan,
  INITIAL_STATE,
  decide,
} from './controller.js';
import type { ControlSample } from './control-trace.js';
import { MigrationObserver } from './migration-observer.js';
import { NO_THROTTLE_YET } from './supervise.js';

const PAGE = 4096;
const STEP_MS = 10;

/** What the guest and host do, as functions of time (ms since the checkpoint started). */
export interface GuestAndHost {
  ramBytes: number;
  /** Stream bytes/s QEMU sends while the VM runs. */
  sendBps(t: number): number;
  /** Bytes of RAM QEMU works through per second in its first pass (zero pages included). */
  scanBps(t: number): number;
  /** Share of first-pass pages that carry data. */
  dataShare: number;
  /** Bytes/s of distinct pages the guest dirties when not throttled. */
  dirtyBps(t: number): number;
  /** Rate of the stopped stage, bytes/s. */
  stopRateBps: number;
  /** Stop cost beyond sending (device state, TCG fix-up), ms. */
  fixedStopMs: number;
  /** From QEMU's switchover decision to the stopped VM, ms. */
  stopLatencyMs(throttlePct: number): number;
}

export interface SimResult {
  /** When the VM ran again, ms since start. */
  endMs: number;
  downtimeMs: number;
  forced: boolean;
  maxThrottlePct: number;
  /** The controller's last plan before the stop. */
  plan: Plan | undefined;
  samples: ControlSample[];
}

export interface SimOptions {
  /** Ignore the controller's forced switchovers (the counterfactual: what continuing would do). */
  ignoreForce?: boolean;
  /** Give up after this long (a run that never converges), ms. */
  limitMs?: number;
}

/** QEMU's auto-converge: dirty-rate periods of at least this long, evaluated at a sync. */
const PERIOD_MS = 1000;

export function simulatePrecopy(cfg: ControllerConfig, g: GuestAndHost, opts: SimOptions = {}): SimResult {
  const observer = new MigrationObserver(g.ramBytes);
  let state: ControllerState = INITIAL_STATE;
  let plan: Plan | undefined;
  // QEMU's migration parameters as tlc sets them at the start (see take.ts, supervise.ts).
  let limitMs = state.downtimeLimitMs;
  const triggerPct = NO_THROTTLE_YET['throttle-trigger-threshold'] ?? 50;
  // tlc sets cpu-throttle-initial, -increment and max-cpu-throttle all to its cap, so whenever
  // auto-converge acts, the throttle becomes the cap.
  let capPct = NO_THROTTLE_YET['max-cpu-throttle'] ?? 1;
  let throttle = 0;
  let maxThrottle = 0;
  // Migration state: the first pass walks RAM; then passes send the synced dirty set.
  let syncs = 1;
  let remaining = g.ramBytes;
  let dirtySinceSync = 0;
  let normal = 0;
  let duplicate = 0;
  let received = 0;
  let periodStart = 0;
  let periodDirty = 0;
  let periodSent = 0;
  let highCount = 0;
  let dirtyPagesRate = 0;
  let forced = false;
  let stopAt: number | undefined;
  const samples: ControlSample[] = [];
  const limit = opts.limitMs ?? 120_000;

  for (let t = 0; t < limit; t += STEP_MS) {
    if (stopAt !== undefined && t >= stopAt) {
      const set = Math.min(g.ramBytes, remaining + dirtySinceSync);
      const data = syncs === 1 ? set * g.dataShare : set;
      const downtimeMs = (data / g.stopRateBps) * 1000 + g.fixedStopMs;
      return { endMs: t + downtimeMs, downtimeMs, forced, maxThrottlePct: maxThrottle, plan, samples };
    }
    // The guest dirties; distinct pages cannot exceed RAM.
    const dirtied = (g.dirtyBps(t) * (1 - throttle / 100) * STEP_MS) / 1000;
    dirtySinceSync = Math.min(g.ramBytes, dirtySinceSync + dirtied);
    periodDirty += dirtied;
    // QEMU works through the remaining set.
    const firstPass = syncs === 1;
    const capacity = ((firstPass ? g.scanBps(t) : g.sendBps(t)) * STEP_MS) / 1000;
    const done = Math.min(remaining, capacity);
    remaining -= done;
    const dataPages = Math.round(((firstPass ? g.dataShare : 1) * done) / PAGE);
    normal += dataPages;
    duplicate += Math.round(done / PAGE) - dataPages;
    const bytes = dataPages * PAGE;
    received += bytes;
    periodSent += bytes;
    const qemuBytesPerMs = g.sendBps(t) / 1000;
    const sync = (): void => {
      remaining += dirtySinceSync;
      dirtySinceSync = 0;
      syncs++;
      if (t - periodStart >= PERIOD_MS) {
        dirtyPagesRate = (periodDirty * 1000) / (t - periodStart) / PAGE;
        if (periodDirty > (periodSent * triggerPct) / 100 && ++highCount >= 2) {
          highCount = 0;
          throttle = capPct;
          maxThrottle = Math.max(maxThrottle, throttle);
        }
        periodStart = t;
        periodDirty = 0;
        periodSent = 0;
      }
    };
    if (stopAt === undefined) {
      const threshold = qemuBytesPerMs * limitMs;
      if (remaining < threshold) {
        sync();
        if (remaining < threshold) stopAt = t + g.stopLatencyMs(throttle);
      } else if (remaining === 0) {
        sync();
      }
    }
    if (t % cfg.tickMs !== 0 || stopAt !== undefined) continue;
    const sample: ControlSample = {
      t,
      status: 'active',
      remaining,
      normal,
      duplicate,
      received,
      dirtyPagesRate,
      throttlePct: throttle,
      syncs,
      mbps: (g.sendBps(t) * 8) / 1e6,
      stopped: false,
    };
    samples.push(sample);
    const m = observer.observe(sample);
    const result = decide(cfg, state, m);
    plan = result.decision.plan;
    if (result.decision.switchover && opts.ignoreForce) continue;
    state = result.state;
    const d = result.decision;
    if (d.downtimeLimitMs !== undefined) limitMs = d.downtimeLimitMs;
    if (d.throttleCapPct !== undefined) {
      capPct = Math.max(1, d.throttleCapPct);
    }
    if (d.switchover) {
      forced = true;
      stopAt = t + g.stopLatencyMs(throttle);
    }
  }
  return {
    endMs: Number.POSITIVE_INFINITY,
    downtimeMs: 0,
    forced,
    maxThrottlePct: maxThrottle,
    plan,
    samples,
  };
}

/**
 * The guest and host of a recorded trace: send and scan rates as they were at each moment, the
 * dirty rate each of QEMU's syncs revealed (in hindsight, over the pass before it; unthrottled
 * by the throttle then applied), the first pass's share of data pages. Beyond the trace's end the
 * last rates hold.
 */
export function guestAndHostFromTrace(
  samples: readonly ControlSample[],
  ramBytes: number,
  stop: { stopRateBps: number; fixedStopMs: number },
): GuestAndHost {
  const running = samples.filter((s) => !s.stopped && s.status === 'active');
  const times: number[] = [];
  const send: number[] = [];
  const scan: number[] = [];
  for (let i = 1; i < running.length; i++) {
    const a = running[i - 1] as ControlSample;
    const b = running[i] as ControlSample;
    const dt = (b.t - a.t) / 1000;
    if (dt <= 0) continue;
    times.push(b.t);
    send.push(Math.max(0, (b.received - a.received) / dt));
    scan.push(Math.max(0, ((b.normal + b.duplicate - a.normal - a.duplicate) * PAGE) / dt));
  }
  // Dirty rate per window between syncs, from how much each sync added.
  const dirtyEnds: number[] = [];
  const dirtyRates: number[] = [];
  let prevSyncT = running[0]?.t ?? 0;
  for (let i = 1; i < running.length; i++) {
    const a = running[i - 1] as ControlSample;
    const b = running[i] as ControlSample;
    if (b.syncs === a.syncs) continue;
    const added = b.remaining - a.remaining + (b.normal + b.duplicate - a.normal - a.duplicate) * PAGE;
    const unthrottled = 1 - Math.min(99, b.throttlePct) / 100;
    dirtyRates.push(Math.max(0, (added * 1000) / Math.max(1, b.t - prevSyncT)) / unthrottled);
    dirtyEnds.push(b.t);
    prevSyncT = b.t;
  }
  const firstPassEnd = running.find((s) => s.syncs >= 2) ?? running.at(-1);
  const dataShare = firstPassEnd
    ? firstPassEnd.normal / Math.max(1, firstPassEnd.normal + firstPassEnd.duplicate)
    : 1;
  const at = (ts: number[], vs: number[], t: number): number => {
    const i = ts.findIndex((x) => x >= t);
    return (i < 0 ? vs.at(-1) : vs[i]) ?? 0;
  };
  return {
    ramBytes,
    sendBps: (t) => at(times, send, t),
    scanBps: (t) => Math.max(at(times, scan, t), at(times, send, t)),
    dataShare,
    dirtyBps: (t) => at(dirtyEnds, dirtyRates, t),
    stopRateBps: stop.stopRateBps,
    fixedStopMs: stop.fixedStopMs,
    // Seen: 0.1 s typically, 0.8 s once under a 99% throttle.
    stopLatencyMs: (throttlePct) => 100 + 7 * throttlePct,
  };
}
