/**
 * The time-bound controller (after the TLM idea in the seeds): keep a live checkpoint within its
 * deadline with as little downtime as the deadline allows. A pure function of measurements and
 * time; `supervise.ts` turns its decisions into QMP calls.
 *
 * - tlc, not QEMU, decides how large a set may be sent while the VM is stopped. QEMU switches
 *   over when the remaining set is below its own bandwidth estimate × downtime-limit; that
 *   estimate counts the zero pages of a first pass and the rate of a VM that is running, and let
 *   QEMU stop a 1 GiB guest for 0.5 s against 300 ms preferred. So tlc sets downtime-limit each
 *   tick to the set it allows (preferred downtime, or stop-and-save if that is cheaper, minus the
 *   fixed stop cost, at the stopped stage's rate) divided by QEMU's bandwidth estimate.
 * - The remaining work is the data still to send: during the first pass `ram.remaining` counts
 *   every page not scanned yet, zero or not, so it is scaled by the share of pages that carried
 *   data so far; and it is sent at the stopped stage's rate, which on a busy host is well above
 *   the rate measured while vCPUs compete with the sender (1-2 GB/s stopped vs 0.3-0.6 running,
 *   1 GiB TCG guest beside a CPU hog on 2 cores).
 * - Throttling starts as soon as the projection (finish the first pass, shrink the dirty set at
 *   send − dirty rate, stop) says the deadline would be missed, not when dirtying already beats
 *   sending: QEMU 7.2's auto-converge applies a throttle only after two dirty-rate periods of at
 *   least a second each, so a late decision is a forced stop.
 * - A switchover is forced only at the last moment an immediate stop still meets the deadline:
 *   continuing past it could not finish in time.
 */

export interface ControllerConfig {
  /** ms since the deadline clock started by which the VM must run again. */
  deadlineMs: number;
  /** Preferred downtime. */
  maxDowntimeMs: number;
  /** Fixed stop-time cost beyond sending the dirty set (device state, TCG fix-up, cont), ms. */
  fixedDowntimeMs: number;
  /** How often the controller runs: the switchover must be decided at least a tick early. */
  tickMs: number;
  /**
   * Rate of the final, stopped stage (bytes/s): learned from earlier checkpoints of this VM, or
   * nominal. The measured running rate is used when it is higher.
   */
  stopRateBps: number;
}

export interface Measurement {
  elapsedMs: number;
  /** Pages QEMU still counts as dirty, in bytes (query-migrate ram.remaining). */
  remainingBytes: number;
  /**
   * Bytes the guest dirtied since QEMU last synced its dirty bitmap (dirty rate × time since the
   * sync): `remaining` leaves them out until the next sync, but a stop would have to send them.
   */
  dirtiedSinceSyncBytes: number;
  /** Stream bytes per second arriving at tlc recently; 0 while unknown. */
  transferBps: number;
  /** Pages QEMU processes per second (sent or found zero) × page size; 0 while unknown. */
  scanBps: number;
  /** Bytes per second the guest dirties under the current throttle; 0 while unknown. */
  dirtyBps: number;
  /** vCPU throttle QEMU applies now, percent. */
  throttlePct: number;
  /** The first full pass over memory is done (QEMU synced its dirty bitmap again). */
  firstPassDone: boolean;
  /** Share of the pages QEMU has processed so far that carried data (0..1); 1 while unknown. */
  dataShare: number;
  /** Guest RAM size, bytes. */
  ramBytes: number;
  /** Estimate of the bytes of RAM that hold data (what stop-and-save would send). */
  ramDataBytes: number;
  /** QEMU's own bandwidth estimate in bytes per ms (query-migrate ram.mbps × 125); 0 if unknown. */
  qemuBytesPerMs: number;
}

export interface ControllerState {
  /** Highest throttle the controller currently allows, percent (0 = none). */
  throttleCapPct: number;
  switchedOver: boolean;
  /** downtime-limit last sent to QEMU, ms. */
  downtimeLimitMs: number;
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
  /** What the controller projected at this tick (for traces and reports). */
  plan: Plan;
}

export interface Plan {
  /** Expected downtime if the VM stopped now, ms. */
  stopNowMs: number;
  /** Downtime the controller aims for: the preferred one, or stop-and-save if that is less. */
  allowedMs: number;
  /** What stopping the VM and saving all its data would cost, ms. */
  stopAndSaveMs: number;
  /** Largest remaining set (bytes of data) QEMU may stop with. */
  targetSetBytes: number;
  /** When the checkpoint would end if it continues unforced, ms since start (Infinity: never). */
  finishMs: number;
}

/** QEMU's downtime-limit until the controller has a bandwidth to convert: switch only on tlc's word. */
export const INITIAL_DOWNTIME_LIMIT_MS = 1;
export const INITIAL_STATE: ControllerState = {
  throttleCapPct: 0,
  switchedOver: false,
  downtimeLimitMs: INITIAL_DOWNTIME_LIMIT_MS,
};

/** QEMU 7.2 accepts downtime-limit up to this many ms. */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;
export const MAX_THROTTLE_PCT = 99;
/** Switch over when the time left is below the expected send time × this, plus fixed costs and latency. */
const SWITCHOVER_MARGIN = 1.5;
/**
 * From the decision to the stopped VM: QEMU acts at its next iteration, after a last dirty sync,
 * once the vCPUs are out of the guest. Measured 0.1-0.5 s, and 0.8 s under a 99% throttle (1 GiB
 * TCG guest, CPU hog beside, QEMU 7.2): a base plus a share that grows with the throttle.
 */
function switchLatencyMs(throttlePct: number): number {
  return 400 + 6 * throttlePct;
}
/**
 * The projection keeps this share of the time left in reserve before it asks for a throttle:
 * rates move, and QEMU applies a throttle a second or two after it is allowed.
 */
const PLAN_RESERVE = 0.3;
/** QEMU's auto-converge acts this long after the controller allows a throttle (two 1 s periods). */
const THROTTLE_LAG_MS = 2000;
/**
 * When the fixed stop cost alone exceeds the allowed downtime, the set QEMU may still stop with:
 * this share of what the preferred downtime would send. Waiting for an empty set would end in a
 * forced, larger stop.
 */
const MIN_SET_SHARE = 0.25;
/** downtime-limit changes smaller than this ratio are not sent (QMP traffic, QEMU's own jitter). */
const LIMIT_HYSTERESIS = 0.1;

/**
 * Bytes of data a stop would send now: unscanned pages of the first pass carry data at the share
 * seen so far; pages dirtied since the last sync come on top (at most all the data there is).
 */
export function remainingDataBytes(m: Measurement): number {
  const unsent = m.firstPassDone ? m.remainingBytes : m.remainingBytes * m.dataShare;
  return Math.min(m.ramDataBytes, unsent + m.dirtiedSinceSyncBytes);
}

/** Rate the stopped stage sends at: never below what is measured while the guest runs. */
export function stopRateBps(cfg: ControllerConfig, m: Measurement): number {
  return Math.max(cfg.stopRateBps, m.transferBps);
}

export function expectedDowntimeMs(
  cfg: ControllerConfig,
  m: Measurement,
  bytes = remainingDataBytes(m),
): number {
  return (bytes / stopRateBps(cfg, m)) * 1000 + cfg.fixedDowntimeMs;
}

export function plan(cfg: ControllerConfig, m: Measurement): Plan {
  const rate = stopRateBps(cfg, m);
  const stopNowMs = expectedDowntimeMs(cfg, m);
  // Stop-and-save sends every page with data once; it has no TCG fix-up, but it has the device
  // state and the cont, which the fixed cost also covers.
  const stopAndSaveMs = expectedDowntimeMs(cfg, m, m.ramDataBytes);
  const allowedMs = Math.min(cfg.maxDowntimeMs, stopAndSaveMs);
  const targetSetBytes = Math.max(
    ((allowedMs - cfg.fixedDowntimeMs) * rate) / 1000,
    (MIN_SET_SHARE * cfg.maxDowntimeMs * rate) / 1000,
  );
  return {
    stopNowMs,
    allowedMs,
    stopAndSaveMs,
    targetSetBytes,
    finishMs: projectFinish(cfg, m, targetSetBytes, m.dirtyBps),
  };
}

/**
 * The dirty set the convergence starts from, and when: now after the first pass; during it, at its
 * end (the rest of the pass at the scan rate), holding what the guest dirties meanwhile.
 */
function convergenceStart(m: Measurement, dirtyBps: number): { passLeftMs: number; set: number } {
  if (m.firstPassDone) return { passLeftMs: 0, set: m.remainingBytes };
  const scan = Math.max(m.scanBps, m.transferBps);
  const passLeftMs = scan > 0 ? (m.remainingBytes / scan) * 1000 : Number.POSITIVE_INFINITY;
  return { passLeftMs, set: Math.min(m.ramDataBytes, (dirtyBps * passLeftMs) / 1000) };
}

/**
 * When the checkpoint ends if nothing is forced: the rest of the first pass, then the dirty set
 * shrinking at send − dirty rate down to the target, then the stop.
 */
function projectFinish(cfg: ControllerConfig, m: Measurement, target: number, dirtyBps: number): number {
  const send = m.transferBps;
  if (send <= 0) return Number.POSITIVE_INFINITY;
  const { passLeftMs, set } = convergenceStart(m, dirtyBps);
  let convergeMs = 0;
  if (set > target) {
    if (dirtyBps >= send) return Number.POSITIVE_INFINITY;
    convergeMs = ((set - target) / (send - dirtyBps)) * 1000;
  }
  return m.elapsedMs + passLeftMs + convergeMs + expectedDowntimeMs(cfg, m, Math.min(set, target));
}

/**
 * Throttle (percent) that makes the projection fit the time available: the dirty rate the
 * convergence needs, against the rate the guest would dirty unthrottled.
 */
export function neededThrottlePct(cfg: ControllerConfig, m: Measurement, p: Plan): number {
  const timeLeft = cfg.deadlineMs - m.elapsedMs;
  if (m.transferBps <= 0 || m.dirtyBps <= 0) return 0;
  if (p.finishMs <= m.elapsedMs + timeLeft * (1 - PLAN_RESERVE)) return 0;
  const unthrottled = m.dirtyBps / Math.max(0.01, 1 - m.throttlePct / 100);
  // The throttle acts only after QEMU's lag; until then the guest dirties at today's rate.
  const { passLeftMs, set } = convergenceStart(m, m.dirtyBps);
  const budgetMs =
    timeLeft * (1 - PLAN_RESERVE) -
    Math.max(THROTTLE_LAG_MS, passLeftMs) -
    expectedDowntimeMs(cfg, m, p.targetSetBytes);
  const neededNet = budgetMs > 0 ? ((set - p.targetSetBytes) / budgetMs) * 1000 : Number.POSITIVE_INFINITY;
  const allowedDirty = m.transferBps - neededNet;
  if (allowedDirty <= 0) return MAX_THROTTLE_PCT;
  return Math.min(MAX_THROTTLE_PCT, Math.max(0, Math.ceil((1 - allowedDirty / unthrottled) * 100)));
}

/**
 * QEMU's downtime-limit that makes its own switchover test (set < bandwidth × limit) mean at most
 * `bytes`. QEMU measures its bandwidth anew every 100 ms, and it jumps (a zero-page stretch sends
 * a few bytes per page, the next stretch of data a thousand times more): converting with at least
 * the stopped stage's rate keeps the threshold at or below `bytes` whenever QEMU's running
 * bandwidth does not exceed that rate.
 */
export function downtimeLimitFor(bytes: number, qemuBytesPerMs: number, stopBytesPerMs: number): number {
  const perMs = Math.max(qemuBytesPerMs, stopBytesPerMs);
  if (perMs <= 0) return INITIAL_DOWNTIME_LIMIT_MS;
  return Math.min(MAX_DOWNTIME_LIMIT_MS, Math.max(1, Math.floor(bytes / perMs)));
}

export function decide(
  cfg: ControllerConfig,
  state: ControllerState,
  m: Measurement,
): { state: ControllerState; decision: Decision } {
  const p = plan(cfg, m);
  if (state.switchedOver) return { state, decision: { plan: p } };
  const timeLeft = cfg.deadlineMs - m.elapsedMs;
  // The margin covers the uncertain part (sending the remaining set), not the fixed stop cost.
  const latency = 2 * cfg.tickMs + switchLatencyMs(m.throttlePct);
  const mustSwitch =
    timeLeft <= latency ||
    timeLeft <= (p.stopNowMs - cfg.fixedDowntimeMs) * SWITCHOVER_MARGIN + cfg.fixedDowntimeMs + latency;
  if (mustSwitch && p.stopNowMs > p.allowedMs) {
    // QEMU switches over once the remaining set fits its bandwidth × downtime-limit: the largest
    // limit makes its next check succeed whatever its estimate is.
    return {
      state: { ...state, switchedOver: true, downtimeLimitMs: MAX_DOWNTIME_LIMIT_MS },
      decision: {
        plan: p,
        downtimeLimitMs: MAX_DOWNTIME_LIMIT_MS,
        switchover: {
          reason:
            `deadline ${cfg.deadlineMs} ms: ${Math.max(0, Math.round(timeLeft))} ms left, stopping now needs ~${Math.round(p.stopNowMs)} ms` +
            (Number.isFinite(p.finishMs)
              ? `, continuing would end at ~${Math.round(p.finishMs)} ms`
              : ', continuing would not converge'),
          expectedDowntimeMs: p.stopNowMs,
        },
      },
    };
  }
  const decision: Decision = { plan: p };
  const next = { ...state };
  const limit = downtimeLimitFor(p.targetSetBytes, m.qemuBytesPerMs, stopRateBps(cfg, m) / 1000);
  if (Math.abs(limit - state.downtimeLimitMs) > LIMIT_HYSTERESIS * state.downtimeLimitMs) {
    decision.downtimeLimitMs = limit;
    next.downtimeLimitMs = limit;
  }
  const needed = neededThrottlePct(cfg, m, p);
  if (needed > state.throttleCapPct) {
    decision.throttleCapPct = needed;
    next.throttleCapPct = needed;
  }
  return { state: next, decision };
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
