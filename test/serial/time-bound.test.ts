import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import { CheckpointStore } from '../../src/store/store.js';
import { connectVm, killVm, startVm, stopVm } from '../../src/vm/manager.js';
import { isolatedTlc } from '../integration/harness.js';

isolatedTlc();
const store = new CheckpointStore();

describe('time-bound live checkpoint', () => {
  it('finishes a non-converging live checkpoint within its deadline, unthrottled after, memory verified', async () => {
    // 512 MiB guest rewriting a 256 MiB working set at random, sent at 64 MiB/s: the guest
    // re-dirties its whole working set within every pass, so plain pre-copy never converges (the
    // seeds' case); the stopped stage runs uncapped, but 256 MiB is more than the preferred
    // downtime allows, so only a throttle or a forced switchover ends it.
    await startVm({ name: 'busy', memMiB: 512, workload: 'memverify:256' });
    await sleep(1000);
    const deadlineMs = 5000;
    const ckpt = await takeCheckpoint({
      vm: 'busy',
      mode: 'live',
      store,
      deadlineMs,
      maxBandwidthBps: 64 * 1024 * 1024,
    });
    const control = ckpt.manifest.metrics.control;
    assert.ok(control, 'live mode reports what the controller did');
    const m = ckpt.manifest.metrics;
    assert.equal(
      control.metDeadline,
      true,
      `deadline ${deadlineMs} ms missed: setup ${m.setupMs.toFixed(0)} ms (warm-up ${m.warmUpMs?.toFixed(0)}), total ${m.totalMs.toFixed(0)} ms, ` +
        `downtime ${m.stage3.downtimeMs.toFixed(0)} ms, switchover ${JSON.stringify(control.forcedSwitchover)}`,
    );
    assert.ok(
      ckpt.manifest.metrics.totalMs <= deadlineMs + 250,
      `VM ran again after ${ckpt.manifest.metrics.totalMs} ms`,
    );
    assert.ok(
      control.forcedSwitchover || control.maxThrottlePct > 0,
      'the controller (a throttle or the deadline), not plain convergence, ended this checkpoint',
    );

    const { qmp } = await connectVm('busy');
    const info = await qmp.execute('query-migrate');
    const status = await qmp.execute('query-status');
    qmp.close();
    assert.equal(info.status, 'completed');
    assert.equal(info['cpu-throttle-percentage'] ?? 0, 0, 'no throttle left on the guest');
    assert.equal(status.status, 'running');

    await killVm('busy');
    const restored = await restoreCheckpoint({ ref: ckpt.id, store, name: 'busy-restored' });
    const scan = await observeGuest(restored.record.paths.consoleLog, 5000);
    await stopVm('busy-restored', { force: true });
    assert.deepEqual(continuationProblems(scan, ckpt.manifest.guestHeartbeatSeqBefore), []);
  });
});
