/**
 * Time-bound live checkpoint benchmark: tlc's deadline controller against stock QEMU pre-copy
 * (default 128 MiB/s, 300 ms downtime limit) and QEMU with unlimited bandwidth, on one guest per
 * workload, side by side in one run.
 *
 *   npm run bench:timebound [-- --quick]
 *
 * Per run: finished or not (baselines get a timeout), time to completion vs deadline, QEMU's
 * downtime, tlc's downtime (QEMU event timestamps), the guest's longest stall and its progress
 * during the checkpoint relative to before (from the `dirty` workload's heartbeats).
 * Writes bench/out/timebound-<timestamp>.json.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { takeCheckpoint } from '../checkpoint/take.js';
import { CheckpointStore } from '../store/store.js';
import { startVm, stopVm } from '../vm/manager.js';
import { runQemuMigration } from './baseline.js';
import { measureGuestWindow } from './measure.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const quick = process.argv.includes('--quick');
const MEM_MIB = 512;
const WORKLOADS = quick
  ? ['idle', 'dirty:128:random', 'dirty:384:random']
  : [
      'idle',
      'dirty:128:random',
      'dirty:384:random',
      'dirty:128:stream',
      'dirty:384:stream',
      'dirty:128:hotcold',
      'dirty:384:hotcold',
    ];
const DEADLINES_MS = quick ? [2000, 5000] : [2000, 5000, 10_000];
const BASELINE_TIMEOUT_MS = quick ? 15_000 : 30_000;
const workspace = benchWorkspace('timebound');
const store = new CheckpointStore();

async function qemuBaseline(vm: string, unlimited: boolean): Promise<Record<string, unknown>> {
  const r = await runQemuMigration(vm, {
    uri: 'exec:cat > /dev/null',
    maxBandwidthBps: unlimited ? 1024 ** 4 : 128 * 1024 * 1024,
    timeoutMs: BASELINE_TIMEOUT_MS,
  });
  return r.finished
    ? { finished: true, totalMs: r.qemuTotalMs, qemuDowntimeMs: r.qemuDowntimeMs, bytesSent: r.bytesSent }
    : r.error
      ? { finished: false, error: r.error }
      : { finished: false, totalMs: null, timeoutMs: BASELINE_TIMEOUT_MS, bytesSent: r.bytesSent };
}

async function main(): Promise<void> {
  const runs: Record<string, unknown>[] = [];
  for (const workload of WORKLOADS) {
    const vm = `tb-${workload.replace(/:/g, '-')}`;
    process.stderr.write(`\n== ${workload} (${MEM_MIB} MiB guest)\n`);
    const started = await startVm({
      name: vm,
      memMiB: MEM_MIB,
      workload,
      accel: 'tcg',
      bootTimeoutMs: 180_000,
    });
    const consoleLog = started.record.paths.consoleLog;
    await sleep(1000);
    for (const deadlineMs of DEADLINES_MS) {
      const w = await measureGuestWindow(consoleLog, () =>
        takeCheckpoint({ vm, mode: 'live', store, deadlineMs }),
      );
      const m = w.result.manifest.metrics;
      const run = {
        workload,
        method: 'tlc live',
        deadlineMs,
        finished: true,
        metDeadline: m.control?.metDeadline ?? null,
        totalMs: Math.round(m.totalMs),
        downtimeMs: Math.round(m.stage3.downtimeMs),
        qemuDowntimeMs: m.qemuDowntimeMs ?? null,
        maxThrottlePct: m.control?.maxThrottlePct ?? 0,
        forcedSwitchover: Boolean(m.control?.forcedSwitchover),
        tcgFixupPages: m.tcgFixup?.pages ?? null,
        guestMaxStallMs: w.guest.maxStallMs,
        guestProgressRatio: w.guest.rateRatio,
      };
      runs.push(run);
      process.stderr.write(`${JSON.stringify(run)}\n`);
      store.remove(w.result.id);
    }
    for (const unlimited of [false, true]) {
      const w = await measureGuestWindow(consoleLog, () => qemuBaseline(vm, unlimited));
      const run = {
        workload,
        method: unlimited ? 'QEMU pre-copy, unlimited bandwidth' : 'QEMU pre-copy, stock parameters',
        ...w.result,
        guestMaxStallMs: w.guest.maxStallMs,
        guestProgressRatio: w.guest.rateRatio,
      };
      runs.push(run);
      process.stderr.write(`${JSON.stringify(run)}\n`);
    }
    await stopVm(vm, { force: true });
  }
  const stamp = {
    ...machineStamp(),
    guestMiB: MEM_MIB,
    accel: 'tcg',
    baselineTimeoutMs: BASELINE_TIMEOUT_MS,
  };
  const file = saveResult('timebound', stamp.date, 'json', JSON.stringify({ stamp, runs }, null, 2) + '\n');
  process.stderr.write(`saved ${file}\n`);
}

await workspace.run(main);
