import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import type { CheckpointMode } from '../../src/store/manifest.js';
import { CheckpointStore, type StoredCheckpoint } from '../../src/store/store.js';
import { verifyCheckpoint } from '../../src/store/verify.js';
import { killVm, startVm, stopVm } from '../../src/vm/manager.js';
import { isolatedTlc } from './harness.js';

isolatedTlc();
const store = new CheckpointStore();
const OBSERVE_MS = 5000;

/** Restores a checkpoint under `name`, watches it, and returns what went wrong (nothing, ideally). */
async function restoreAndCheck(ckpt: StoredCheckpoint, name: string, eager: boolean): Promise<string[]> {
  const restored = await restoreCheckpoint({ ref: ckpt.id, store, name, eager });
  assert.equal(restored.mode, eager ? 'eager' : 'lazy');
  const scan = await observeGuest(restored.record.paths.consoleLog, OBSERVE_MS);
  await stopVm(name, { force: true });
  return continuationProblems(scan, ckpt.manifest.guestHeartbeatSeqBefore).map((p) => `${name}: ${p}`);
}

for (const mode of ['live', 'cow', 'stop'] as CheckpointMode[]) {
  describe(`${mode} checkpoints of a running memverify guest`, () => {
    it('three checkpoints, VM killed, each restored lazily and eagerly: the guest continues verified', async () => {
      const vmName = `src-${mode}`;
      await startVm({ name: vmName, memMiB: 192, workload: 'memverify:48', accel: 'tcg' });
      await sleep(1000);
      const ckpts: StoredCheckpoint[] = [];
      for (let i = 0; i < 3; i++) {
        const ckpt = await takeCheckpoint({ vm: vmName, mode, store, deadlineMs: 10_000 });
        assert.equal(ckpt.manifest.mode, mode);
        assert.ok(ckpt.manifest.guestHeartbeatSeqBefore !== undefined);
        assert.ok(verifyCheckpoint(ckpt, true).ok, 'fresh checkpoint verifies');
        for (const f of fs.readdirSync(ckpt.dir)) {
          assert.equal(fs.statSync(path.join(ckpt.dir, f)).mode & 0o077, 0, `${f} is private`);
        }
        ckpts.push(ckpt);
        await sleep(700);
      }
      assert.deepEqual(
        store
          .list()
          .filter((c) => c.manifest.vm.name === vmName)
          .map((c) => c.id),
        ckpts.map((c) => c.id),
      );
      await killVm(vmName);
      const problems: string[] = [];
      for (const [i, ckpt] of ckpts.entries()) {
        const both = await Promise.all([
          restoreAndCheck(ckpt, `${mode}-${i}-lazy`, false),
          restoreAndCheck(ckpt, `${mode}-${i}-eager`, true),
        ]);
        problems.push(...both.flat());
      }
      assert.deepEqual(problems, []);
      for (const ckpt of ckpts)
        assert.ok(verifyCheckpoint(ckpt, true).ok, 'restores leave the image unchanged');
    });
  });
}
