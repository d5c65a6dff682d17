import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { TlcError } from '../../src/core/errors.js';
import { CheckpointStore } from '../../src/store/store.js';
import { verifyCheckpoint } from '../../src/store/verify.js';
import { startVm, stopVm } from '../../src/vm/manager.js';
import { isAlive } from '../../src/vm/process.js';
import { loadVm } from '../../src/vm/registry.js';
import { heartbeatsAdvance, isolatedTlc, runState } from './harness.js';

isolatedTlc();

/** A 100 MiB filesystem for the store, so a checkpoint runs out of space part-way. */
function smallFilesystem(): string | undefined {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-fulldisk-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=100m,mode=0700', 'tmpfs', dir], { stdio: 'ignore' });
  } catch {
    fs.rmSync(dir, { recursive: true, force: true });
    return undefined;
  }
  after(() => {
    execFileSync('umount', [dir], { stdio: 'ignore' });
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

const mountPoint = smallFilesystem();

describe('a full disk during a checkpoint', () => {
  it(
    'fails with a clear error, keeps the VM running, publishes nothing, and keeps earlier checkpoints',
    {
      skip: mountPoint ? false : 'needs permission to mount a tmpfs (CI runs as root)',
    },
    async () => {
      const store = new CheckpointStore(mountPoint);
      await startVm({ name: 'small', memMiB: 96, workload: 'idle' });
      const first = await takeCheckpoint({ vm: 'small', mode: 'stop', store });
      await stopVm('small', { force: true });

      await startVm({ name: 'big', memMiB: 256, workload: 'memverify:96' });
      let failure: unknown;
      try {
        await takeCheckpoint({ vm: 'big', mode: 'live', store });
      } catch (err) {
        failure = err;
      }
      assert.ok(failure instanceof TlcError, `expected a TlcError, got ${String(failure)}`);
      assert.equal(failure.code, 'E_PERSIST');
      assert.match(failure.message, /ENOSPC/);
      const record = loadVm('big');
      assert.ok(record.process && isAlive(record.process), 'QEMU keeps running');
      assert.equal(await runState(record.paths.qmpSocket), 'running');
      assert.ok(await heartbeatsAdvance(record.paths.consoleLog), 'and its guest works on');
      assert.deepEqual(
        store.list().map((c) => c.id),
        [first.id],
      );
      assert.deepEqual(
        fs.readdirSync(mountPoint as string).filter((e) => e.startsWith('.tmp-')),
        [],
      );
      assert.ok(verifyCheckpoint(store.resolve(first.id), true).ok, 'the earlier checkpoint is intact');
      await stopVm('big', { force: true });
    },
  );
});
