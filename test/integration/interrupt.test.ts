import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { HOLD_ENV, type HoldPoint } from '../../src/checkpoint/hold.js';
import { QmpClient } from '../../src/qmp/client.js';
import { CheckpointStore } from '../../src/store/store.js';
import { startVm, stopVm } from '../../src/vm/manager.js';
import type { VmRecord } from '../../src/vm/registry.js';
import { heartbeatsAdvance, isolatedTlc, migrationConfig, runState, spawnTlc, tlc } from './harness.js';

const { store: storeDir } = isolatedTlc();
const store = new CheckpointStore();

type Mode = 'live' | 'cow' | 'stop';
type Signal = 'SIGINT' | 'SIGTERM' | 'SIGHUP' | 'SIGKILL';
type Moment = HoldPoint;

const SCENARIOS: Record<Mode, [Moment, Signal][]> = {
  live: [
    ['streaming', 'SIGINT'],
    ['stream-complete', 'SIGTERM'],
    ['persist', 'SIGHUP'],
    ['publish', 'SIGINT'],
    ['stream-complete', 'SIGKILL'],
    ['streaming', 'SIGKILL'],
  ],
  cow: [
    ['streaming', 'SIGINT'],
    ['persist', 'SIGTERM'],
    ['publish', 'SIGHUP'],
    ['streaming', 'SIGKILL'],
  ],
  stop: [
    ['stopped', 'SIGINT'],
    ['streaming', 'SIGTERM'],
    ['stream-complete', 'SIGHUP'],
    ['persist', 'SIGINT'],
    ['stopped', 'SIGKILL'],
    ['stream-complete', 'SIGKILL'],
  ],
};

/** Settings an operator might have chosen: tlc changes all of them and must put them back. */
async function setOperatorSettings(qmpSocket: string): Promise<void> {
  const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 5000 });
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 100 * 2 ** 20, 'downtime-limit': 555 });
  } finally {
    qmp.close();
  }
}

async function runningWithin(qmpSocket: string, ms: number): Promise<string> {
  const deadline = Date.now() + ms;
  let state = await runState(qmpSocket);
  while (state !== 'running' && Date.now() < deadline) {
    await sleep(20);
    state = await runState(qmpSocket);
  }
  return state;
}

function ourStaging(pid: number | undefined): string[] {
  return fs.readdirSync(storeDir).filter((e) => e.startsWith('.tmp-') && e.endsWith(`-${pid}`));
}

for (const mode of ['live', 'cow', 'stop'] as const) {
  describe(`interrupting a ${mode} checkpoint`, () => {
    let vm: VmRecord;
    const name = `intr-${mode}`;
    before(async () => {
      vm = (await startVm({ name, memMiB: 128, workload: 'memverify:16' })).record;
      await setOperatorSettings(vm.paths.qmpSocket);
    });
    after(async () => {
      await stopVm(name, { force: true });
    });

    for (const [moment, sig] of SCENARIOS[mode]) {
      it(`${sig} at ${moment}: the guest runs, settings are as found, nothing is published`, async () => {
        const qmpSocket = vm.paths.qmpSocket;
        const configBefore = await migrationConfig(qmpSocket);
        const listedBefore = store.list().map((c) => c.id);
        const cli = spawnTlc(['checkpoint', name, '--mode', mode], { [HOLD_ENV]: moment });
        await cli.waitFor(new RegExp(`holding at ${moment}`));
        const pid = cli.child.pid;
        const signalledAt = Date.now();
        cli.child.kill(sig);
        const code = await cli.exited;

        if (sig === 'SIGKILL') {
          // No handler ran. The next tlc command must pay what the dead one owed, and say so.
          const status = await tlc(['vm', 'status', name]);
          assert.equal(status.code, 0, status.stderr);
          assert.match(
            status.stderr,
            new RegExp(`VM ${name} was left by an interrupted checkpoint.*put back its migration settings`),
          );
          if (moment !== 'streaming' && mode !== 'cow')
            assert.match(status.stderr, /resumed it \(it was (paused|postmigrate)/);
          assert.equal(await runningWithin(qmpSocket, 1000), 'running');
          const again = await tlc(['vm', 'status', name]);
          assert.doesNotMatch(again.stderr, /interrupted checkpoint/, 'the debt is paid once');
        } else {
          assert.equal(code, 128 + (os.constants.signals[sig] ?? 0), cli.stderr());
          const last = cli.stderr().trim().split('\n').at(-1) ?? '';
          assert.match(last, new RegExp(`^tlc: checkpoint of ${name} interrupted by ${sig}`));
          if (moment !== 'streaming' && moment !== 'persist' && moment !== 'publish' && mode !== 'cow')
            assert.match(last, new RegExp(`resumed VM ${name}`));
          assert.match(last, /put back its migration settings/);
          assert.equal(
            await runningWithin(qmpSocket, Math.max(0, 1000 - (Date.now() - signalledAt))),
            'running',
          );
          assert.deepEqual(ourStaging(pid), [], 'the partial checkpoint is removed');
        }
        assert.ok(await heartbeatsAdvance(vm.paths.consoleLog), 'the guest works on');
        assert.deepEqual(
          await migrationConfig(qmpSocket),
          configBefore,
          "QEMU's migration settings as found",
        );
        assert.deepEqual(
          store.list().map((c) => c.id),
          listedBefore,
          'nothing published',
        );
      });
    }
  });
}

describe('a second Ctrl-C while tlc undoes a checkpoint', () => {
  it('does not abandon the paused guest', async () => {
    const name = 'intr-twice';
    const { record } = await startVm({ name, memMiB: 128, workload: 'memverify:16' });
    try {
      const cli = spawnTlc(['checkpoint', name, '--mode', 'live'], { [HOLD_ENV]: 'stream-complete' });
      await cli.waitFor(/holding at stream-complete/);
      cli.child.kill('SIGINT');
      cli.child.kill('SIGINT');
      cli.child.kill('SIGINT');
      assert.equal(await cli.exited, 130);
      assert.match(cli.stderr(), /interrupted by SIGINT.*resumed VM intr-twice/);
      assert.equal(await runningWithin(record.paths.qmpSocket, 1000), 'running');
      assert.ok(await heartbeatsAdvance(record.paths.consoleLog));
    } finally {
      await stopVm(name, { force: true });
    }
  });
});
