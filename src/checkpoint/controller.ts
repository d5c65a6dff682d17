/**
 * The time-bound controller (after the TLM idea in the seeds): keep a live checkpoint within its
 * deadline with as little downtime as the deadline allows. A pure function of measurements and
 * time; `take.ts` turns its decisions into QMP calls.
 *
 * - Let QEMU converge on its own while the remaining dirty set fits the preferred downtime.
 * - When the guest dirties memory faster than it can be sent, allow QEMU's auto-converge to slow
 *   the vCPUs just enough that the dirty rate falls below the transfer rate.
 * - When the deadline gets close, raise the downtime limit to what completion needs, so QEMU
 *   stops iterating and switches over: the deadline wins over the preferred downtime.
 */

export interface ControllerConfig {
  /** ms since the checkpoint started by which the VM must run again. */
  deadlineMs: number;
  /** Preferred downtime. */
  maxDowntimeMs: number;
  /** Fixed stop-time cost beyond sending the dirty set (device state, TCG fix-up), ms. */
  fixedDowntimeMs: number;
  /** How often the controller runs: the switchover must be decided at least a tick early. */
  tickMs: number;
  /**
   * Rate of the final, stopped stage when it differs from the measured one: QEMU sends the last
   * pages without its bandwidth cap, so with a capped pre-copy the stop is faster than the passes.
   */
  stopRateBps?: number;
}

export interface Measurement {
  elapsedMs: number;
  /** Dirty bytes QEMU still has to send (query-migrate ram.remaining). */
  remainingBytes: number;
  /** Bytes per second arriving at tlc recently; 0 while unknown. */
  transferBps: number;
  /** Bytes per second the guest dirties (dirty-pages-rate × page size); 0 while unknown. */
  dirtyBps: number;
  /** vCPU throttle QEMU applies now, percent. */
  throttlePct: number;
}

export interface ControllerState {
  /** Highest throttle the controller currently allows, percent (0 = none). */
  throttleCapPct: number;
  switchedOver: boolean;
}

export interface Decision {
  /** New QEMU downtime-limit, ms. */
  downtimeLimitMs?: number;
  /**
   * New throttle cap (QEMU cpu-throttle-initial, -increment and max-cpu-throttle), percent. A
   * non-zero cap also lowers QEMU's trigger so it applies the throttle at its next dirty sync.
   */
  throttleCapPct?: number;
  /** Set when this decision forces the switchover. */
  switchover?: { reason: string; expectedDowntimeMs: number };
}

export const INITIAL_STATE: ControllerState = { throttleCapPct: 0, switchedOver: false };

/** QEMU 7.2 accepts downtime-limit up to this many ms. */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;
export const MAX_THROTTLE_PCT = 99;
/** Aim the throttled dirty rate at this share of the transfer rate, so each pass shrinks the set. */
const TARGET_DIRTY_SHARE = 0.7;
/** A guest whose dirty rate is below this share of the transfer rate converges unaided. */
const FITS_SHARE = 0.9;
/** Switch over when the time left is below the expected send time × this, plus fixed costs and two ticks. */
const SWITCHOVER_MARGIN = 1.5;

export function expectedDowntimeMs(cfg: ControllerConfig, m: Measurement): number {
  const rate = Math.max(m.transferBps, cfg.stopRateBps ?? 0);
  if (rate <= 0) return Number.POSITIVE_INFINITY;
  return (m.remainingBytes / rate) * 1000 + cfg.fixedDowntimeMs;
}

/** Throttle (percent) that brings `dirtyBps` down to the target share of `transferBps`. */
export function neededThrottlePct(m: Measurement): number {
  if (m.transferBps <= 0 || m.dirtyBps <= m.transferBps * FITS_SHARE) return 0;
  // The dirty rate QEMU measured already reflects the current throttle.
  const unthrottled = m.dirtyBps / Math.max(0.01, 1 - m.throttlePct / 100);
  const keep = (TARGET_DIRTY_SHARE * m.transferBps) / unthrottled;
  return Math.min(MAX_THROTTLE_PCT, Math.max(1, Math.ceil((1 - keep) * 100)));
}

export function decide(
  cfg: ControllerConfig,
  state: ControllerState,
  m: Measurement,
): { state: ControllerState; decision: Decision } {
  if (state.switchedOver) return { state, decision: {} };
  const expected = expectedDowntimeMs(cfg, m);
  const timeLeft = cfg.deadlineMs - m.elapsedMs;
  // The margin covers the uncertain part (sending the remaining set), not the fixed stop cost.
  const mustSwitch =
    timeLeft <= 2 * cfg.tickMs ||
    (Number.isFinite(expected) &&
      timeLeft <=
        (expected - cfg.fixedDowntimeMs) * SWITCHOVER_MARGIN + cfg.fixedDowntimeMs + 2 * cfg.tickMs);
  if (mustSwitch && expected > cfg.maxDowntimeMs) {
    // QEMU switches over once the remaining set fits (its own rate estimate × downtime-limit).
    // The limit is only that threshold, not the stop time: the largest value makes the next
    // check succeed whatever QEMU's estimate is.
    return {
      state: { ...state, switchedOver: true },
      decision: {
        downtimeLimitMs: MAX_DOWNTIME_LIMIT_MS,
        switchover: {
          reason: `deadline ${cfg.deadlineMs} ms: ${Math.max(0, Math.round(timeLeft))} ms left, remaining set needs ~${Math.round(expected)} ms`,
          expectedDowntimeMs: expected,
        },
      },
    };
  }
  const needed = neededThrottlePct(m);
  if (needed > state.throttleCapPct) {
    return { state: { ...state, throttleCapPct: needed }, decision: { throttleCapPct: needed } };
  }
  return { state, decision: {} };
}

/** Warm-up, QEMU's ramp-up and persisting the manifest take about a second on small guests. */
const DEFAULT_DEADLINE_MIN_MS = 3000;

/**
 * A deadline to use when the user gives none: three full memory passes at a nominal rate, at
 * least 3 s. `transferBps` is the rate seen in earlier checkpoints of this VM when known.
 */
export function defaultDeadlineMs(ramBytes: number, transferBps: number): number {
  return Math.max(DEFAULT_DEADLINE_MIN_MS, Math.ceil((3 * ramBytes * 1000) / transferBps / 100) * 100);
}
