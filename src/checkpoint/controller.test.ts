import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  type ControllerConfig,
  type ControllerState,
  type Measurement,
  INITIAL_STATE,
  MAX_DOWNTIME_LIMIT_MS,
  MAX_THROTTLE_PCT,
  decide,
  defaultDeadlineMs,
  neededThrottlePct,
} from './controller.js';

const MiB = 1024 * 1024;
const cfg: ControllerConfig = { deadlineMs: 5000, maxDowntimeMs: 300, fixedDowntimeMs: 50, tickMs: 100 };

/**
 * A simulated pre-copy: QEMU sends at `bandwidth`; the guest dirties `dirty` bytes/s of a working
 * set of `wss` bytes, slowed by the throttle QEMU applies (up to the controller's cap, one step per
 * tick, as auto-converge does at each dirty sync). QEMU switches over by itself when the remaining
 * set fits the downtime limit. Returns when the VM would run again.
 */
function simulate(
  c: ControllerConfig,
  trace: { ram: number; wss: number; bandwidth: number; dirty: (t: number) => number },
): { endMs: number; downtimeMs: number; maxThrottle: number; throttleAfter: number; forced: boolean } {
  let state: ControllerState = INITIAL_STATE;
  let remaining = trace.ram;
  let downtimeLimit = c.maxDowntimeMs;
  let throttle = 0;
  let maxThrottle = 0;
  let forced = false;
  for (let t = 0; t < 600_000; t += c.tickMs) {
    const dirtyBps = trace.dirty(t) * (1 - throttle / 100);
    const m: Measurement = {
      elapsedMs: t,
      remainingBytes: remaining,
      transferBps: trace.bandwidth,
      dirtyBps,
      throttlePct: throttle,
    };
    const { state: next, decision } = decide(c, state, m);
    state = next;
    if (decision.downtimeLimitMs !== undefined) downtimeLimit = decision.downtimeLimitMs;
    if (decision.switchover) forced = true;
    if (state.throttleCapPct > throttle && dirtyBps > trace.bandwidth)
      throttle = Math.min(state.throttleCapPct, throttle + 20);
    maxThrottle = Math.max(maxThrottle, throttle);
    const stopMs = (remaining / trace.bandwidth) * 1000 + c.fixedDowntimeMs;
    if (stopMs <= downtimeLimit || downtimeLimit === MAX_DOWNTIME_LIMIT_MS) {
      // Switchover: the VM stops, the rest is sent, QEMU ends the throttle with the migration.
      return { endMs: t + stopMs, downtimeMs: stopMs, maxThrottle, throttleAfter: 0, forced };
    }
    const sent = (trace.bandwidth * c.tickMs) / 1000;
    const dirtied = (dirtyBps * c.tickMs) / 1000;
    // Pages dirtied again join the set still to send; the set never exceeds the working set
    // once the first full pass is through.
    const afterSend = Math.max(0, remaining - sent);
    remaining = Math.min(afterSend + dirtied, Math.max(afterSend, trace.wss));
  }
  return { endMs: Infinity, downtimeMs: Infinity, maxThrottle, throttleAfter: throttle, forced };
}

describe('time-bound controller', () => {
  it('meets the deadline on a guest that never converges (dirty rate far above bandwidth)', () => {
    for (const deadlineMs of [2000, 5000, 10_000]) {
      const c = { ...cfg, deadlineMs };
      const r = simulate(c, { ram: 256 * MiB, wss: 64 * MiB, bandwidth: 400 * MiB, dirty: () => 2000 * MiB });
      assert.ok(r.endMs <= deadlineMs, `deadline ${deadlineMs}: ended at ${r.endMs}`);
      assert.equal(r.throttleAfter, 0);
    }
  });

  it('switches over at once when the deadline cannot hold, finishing as early as physics allows', () => {
    // 256 MiB at 128 MiB/s needs 2 s for one pass: a 1 s deadline cannot be met.
    const r = simulate(
      { ...cfg, deadlineMs: 1000 },
      { ram: 256 * MiB, wss: 64 * MiB, bandwidth: 128 * MiB, dirty: () => 2000 * MiB },
    );
    assert.equal(r.forced, true);
    assert.ok(r.endMs <= 2000 + cfg.fixedDowntimeMs + cfg.tickMs, `ended at ${r.endMs}`);
  });

  it('throttles just enough when dirtying outpaces sending, then converges within the preferred downtime', () => {
    const r = simulate(
      { ...cfg, deadlineMs: 30_000 },
      { ram: 512 * MiB, wss: 128 * MiB, bandwidth: 400 * MiB, dirty: () => 600 * MiB },
    );
    assert.ok(r.maxThrottle > 0 && r.maxThrottle < MAX_THROTTLE_PCT, `throttle ${r.maxThrottle}`);
    assert.ok(r.downtimeMs <= cfg.maxDowntimeMs, `downtime ${r.downtimeMs}`);
    assert.equal(r.forced, false);
  });

  it('does not throttle a guest whose dirty rate already fits', () => {
    const r = simulate(cfg, { ram: 256 * MiB, wss: 16 * MiB, bandwidth: 1000 * MiB, dirty: () => 100 * MiB });
    assert.equal(r.maxThrottle, 0);
    assert.equal(r.forced, false);
    assert.ok(r.endMs < cfg.deadlineMs);
  });

  it('meets the deadline on a recorded trace whose dirty rate jumps mid-checkpoint', () => {
    // Shape of a real TCG run: idle for a second, then a burst far above the transfer rate.
    const r = simulate(
      { ...cfg, deadlineMs: 3000 },
      {
        ram: 1024 * MiB,
        wss: 512 * MiB,
        bandwidth: 900 * MiB,
        dirty: (t) => (t < 1000 ? 10 * MiB : 3000 * MiB),
      },
    );
    assert.ok(r.endMs <= 3000, `ended at ${r.endMs}`);
  });

  it('forces the switchover at the latest one tick before the deadline even without a rate estimate', () => {
    const { decision } = decide(cfg, INITIAL_STATE, {
      elapsedMs: 4850,
      remainingBytes: 10 * MiB,
      transferBps: 0,
      dirtyBps: 0,
      throttlePct: 0,
    });
    assert.ok(decision.switchover);
    assert.equal(decision.downtimeLimitMs, MAX_DOWNTIME_LIMIT_MS);
  });

  it('computes the throttle from the unthrottled dirty rate', () => {
    assert.equal(
      neededThrottlePct({ elapsedMs: 0, remainingBytes: 0, transferBps: 100, dirtyBps: 80, throttlePct: 0 }),
      0,
    );
    const p = neededThrottlePct({
      elapsedMs: 0,
      remainingBytes: 0,
      transferBps: 100,
      dirtyBps: 200,
      throttlePct: 0,
    });
    assert.equal(p, 65); // keep 70 of 200 → throttle 65 %
    const withThrottle = neededThrottlePct({
      elapsedMs: 0,
      remainingBytes: 0,
      transferBps: 100,
      dirtyBps: 100,
      throttlePct: 50,
    });
    assert.equal(withThrottle, 65);
  });

  it('derives a default deadline from RAM size and bandwidth', () => {
    assert.equal(defaultDeadlineMs(256 * MiB, 1000 * MiB), 3000);
    assert.equal(defaultDeadlineMs(4096 * MiB, 500 * MiB), 24_600);
  });
});
