import type { Command } from 'commander';
import { takeCheckpoint } from '../checkpoint/take.js';
import { TlcError } from '../core/errors.js';
import { continuationProblems, observeGuest } from '../guest/observe.js';
import { restoreCheckpoint } from '../restore/restore.js';
import { CheckpointStore } from '../store/store.js';
import { lastHeartbeatSeq } from '../vm/console.js';
import { killVm, startVm, stopVm } from '../vm/manager.js';
import { tryLoadVm, vmState } from '../vm/registry.js';
import { printStages } from './checkpoint.js';
import { formatMs, note } from './output.js';
import { ProgressLine } from './progress.js';
import { parsePositiveInt } from './units.js';

const DEMO_VM = 'tlc-demo';

/**
 * The whole story in one command: boot the bundled guest running memverify, take a live
 * checkpoint, kill the VM as a host failure would, restore it lazily, and show the guest
 * continuing with its memory verified.
 */
export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('boot a guest, checkpoint it live, kill it, restore it, and show it continuing verified')
    .option('--mem <MiB>', 'guest RAM in MiB', '256')
    .option('--workload <spec>', 'guest workload', 'memverify:64')
    .option('--store <dir>', 'checkpoint store directory')
    .option('--keep', 'leave the restored VM running')
    .action(async (o: { mem: string; workload: string; store?: string; keep?: boolean }) => {
      const store = new CheckpointStore(o.store);
      const previous = tryLoadVm(DEMO_VM);
      if (previous && vmState(previous) === 'running') await stopVm(DEMO_VM, { force: true });

      note(`1. booting VM ${DEMO_VM} (${o.mem} MiB, TCG) running ${o.workload}`);
      const started = await startVm({
        name: DEMO_VM,
        memMiB: parsePositiveInt(o.mem, '--mem'),
        workload: o.workload,
        accel: 'tcg',
        log: note,
      });
      note(`   first heartbeat after ${formatMs(started.bootMs)}; letting it run 2 s`);
      const before = await observeGuest(started.record.paths.consoleLog, 2000);
      note(
        `   guest at heartbeat ${before.heartbeats.at(-1)?.seq}, ${before.corruptions.length} corruptions`,
      );

      // The demo keeps only its newest checkpoint, so repeated demos do not fill the disk.
      const older = store.list().filter((c) => c.manifest.vm.name === DEMO_VM);
      for (const c of older) store.remove(c.id);
      if (older.length > 0) note(`   removed ${older.length} checkpoint(s) of earlier demos`);
      note('2. live checkpoint while the guest keeps running');
      const progress = new ProgressLine();
      const ckpt = await takeCheckpoint({
        vm: DEMO_VM,
        mode: 'live',
        store,
        deadlineMs: 10_000,
        onProgress: progress.update,
        onStage: progress.line,
      });
      progress.done();
      printStages(ckpt.manifest, note);
      const seqAtCheckpoint = ckpt.manifest.guestHeartbeatSeqBefore;
      await observeGuest(started.record.paths.consoleLog, 1000);
      note(
        `   guest went on to heartbeat ${lastHeartbeatSeq(started.record.paths.consoleLog)} after the checkpoint`,
      );

      note(`3. killing VM ${DEMO_VM} (SIGKILL, as a host failure would)`);
      await killVm(DEMO_VM);

      note(`4. restoring ${ckpt.id} lazily (RAM image mapped copy-on-write)`);
      const restored = await restoreCheckpoint({ ref: ckpt.id, store, name: DEMO_VM });
      note(`   guest running again ${formatMs(restored.timeToRunningMs)} after QEMU started`);

      note('5. watching the restored guest for 5 s');
      const after = await observeGuest(restored.record.paths.consoleLog, 5000);
      const first = after.heartbeats[0];
      const last = after.heartbeats.at(-1);
      note(
        `   heartbeats ${first?.seq} .. ${last?.seq} (checkpoint taken at ${seqAtCheckpoint}), ` +
          `${after.boots} reboots, ${after.corruptions.length} corrupt pages`,
      );
      const problems = continuationProblems(after, seqAtCheckpoint);
      if (!o.keep) await stopVm(DEMO_VM, { force: true });
      if (problems.length > 0) throw new TlcError('E_RESTORE', `demo failed: ${problems.join('; ')}`);
      note(
        `OK: the restored guest continued from heartbeat ${first?.seq} with every page it touched verified.`,
      );
      if (o.keep) note(`   VM ${DEMO_VM} keeps running: tlc vm console ${DEMO_VM} --follow`);
    });
}
