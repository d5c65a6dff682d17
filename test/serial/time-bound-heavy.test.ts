import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import type { Manifest } from '../../src/store/manifest.js';
import { CheckpointStore } from '../../src/store/store.js';
import { connectVm, killVm, startVm, stopVm } from '../../src/vm/manager.js';
import { isolatedTlc, readConsole, waitConsole } from '../integration/harness.js';

const { home } = isolatedTlc();
const store = new CheckpointStore();

/** A host process that keeps one core busy for as long as the test runs: the loaded host. */
function cpuHog(): ChildProcess {
  const hog = spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore' });
  after(() => {
    if (hog.pid !== undefined && hog.exitCode === null) hog.kill('SIGKILL');
  });
  return hog;
}

/**
 * The rule a live checkpoint keeps: unforced, QEMU stops the VM no longer than the downtime the
 * controller planned (the preferred one, or stop-and-save if less; tlc's own TCG fix-up comes on
 * top and is reported apart); forced by the deadline, no longer than its estimate of stop-and-save.
 * Both within the 1.5× margin the controller itself allows for rates it measured a moment earlier.
 */
function downtimeProblems(m: Manifest['metrics']): string[] {
  const c = m.control;
  if (!c) return ['no control report'];
  const problems: string[] = [];
  const fixup = m.tcgFixup?.ms ?? 0;
  const transferMs = m.stage3.downtimeMs - fixup;
  if (c.forcedSwitchover) {
    if (c.stopAndSaveMs !== undefined && transferMs > 1.5 * c.stopAndSaveMs)
      problems.push(
        `forced stop of ${transferMs.toFixed(0)} ms (without fix-up) > 1.5 × stop-and-save ${c.stopAndSaveMs} ms`,
      );
  } else if (c.plannedDowntimeMs !== undefined && (m.qemuDowntimeMs ?? 0) > 1.5 * c.plannedDowntimeMs) {
    problems.push(`unforced QEMU downtime ${m.qemuDowntimeMs} ms > 1.5 × planned ${c.plannedDowntimeMs} ms`);
  }
  return problems;
}

describe('time bound on a heavy, allocating guest beside a CPU hog', () => {
  it('meets the default deadline five times in a row, within the downtime rule, memory verified', async () => {
    // 1 GiB guest: memverify starts from zero pages, fills 768 MiB as fast as the vCPU writes,
    // and rewrites it at random: the first checkpoint sees mostly zero RAM that fills under it.
    const vm = await startVm({ name: 'heavy', memMiB: 1024, workload: 'memverify:768:0:grow' });
    cpuHog();
    // TLC_TEST_TRACE_DIR keeps the controller's traces (they become fixtures; see controller.test.ts).
    const traces = process.env.TLC_TEST_TRACE_DIR ?? path.join(home, 'traces');
    fs.mkdirSync(traces, { recursive: true });
    const lines: string[] = [];
    let last: Awaited<ReturnType<typeof takeCheckpoint>> | undefined;
    for (let i = 1; i <= 5; i++) {
      process.env.TLC_CONTROL_TRACE = path.join(traces, `${i}.json`);
      last = await takeCheckpoint({ vm: 'heavy', mode: 'live', store });
      const m = last.manifest.metrics;
      const c = m.control;
      assert.ok(c, 'live mode reports what the controller did');
      lines.push(
        `#${i}: deadline ${c.deadlineMs} ms, total ${m.totalMs.toFixed(0)} ms, downtime ${m.stage3.downtimeMs.toFixed(0)} ms ` +
          `(QEMU ${m.qemuDowntimeMs} ms, fix-up ${m.tcgFixup?.ms.toFixed(0)} ms), planned ${c.plannedDowntimeMs} ms, ` +
          `stop-and-save ~${c.stopAndSaveMs} ms, throttle ${c.maxThrottlePct}%, forced ${c.forcedSwitchover ? `at ${c.forcedSwitchover.atMs} ms` : 'no'}`,
      );
      assert.equal(c.metDeadline, true, `checkpoint ${i} missed its deadline:\n${lines.join('\n')}`);
      assert.deepEqual(downtimeProblems(m), [], lines.join('\n'));
    }
    delete process.env.TLC_CONTROL_TRACE;
    process.stderr.write(`${lines.join('\n')}\n`);

    // The guest ran on through all five, unthrottled, and never saw a corrupt page.
    const { qmp } = await connectVm('heavy');
    const info = await qmp.execute('query-migrate');
    const status = await qmp.execute('query-status');
    qmp.close();
    assert.equal(info['cpu-throttle-percentage'] ?? 0, 0, 'no throttle left on the guest');
    assert.equal(status.status, 'running');
    const scan = readConsole(vm.record.paths.consoleLog);
    assert.deepEqual(
      scan.workloadExits,
      [],
      'the workload still runs (900 MiB in a 1 GiB guest was OOM-killed)',
    );
    assert.deepEqual(scan.corruptions, []);
    const newest = scan.heartbeats.at(-1);
    assert.equal(newest?.kind, 'memverify');
    assert.equal(newest.kind === 'memverify' && newest.corrupt, 0);

    assert.ok(last);
    await killVm('heavy');
    const restored = await restoreCheckpoint({ ref: last.id, store, name: 'heavy-restored' });
    // Lazy restore faults 900 MiB of written pages in from the image while the hog runs: give the
    // guest time for a few heartbeats, then check what it printed.
    await waitConsole(
      restored.record.paths.consoleLog,
      (s) => s.heartbeats.length >= 5,
      'heartbeats after restore',
      30_000,
    );
    const after5 = await observeGuest(restored.record.paths.consoleLog, 1000);
    await stopVm('heavy-restored', { force: true });
    assert.deepEqual(continuationProblems(after5, last.manifest.guestHeartbeatSeqBefore), []);
  });
});
