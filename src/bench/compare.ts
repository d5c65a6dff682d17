/**
 * Side-by-side benchmark of tlc against what users would otherwise use, on the same VM and
 * workload in one run: stop-and-save, QEMU live migration to a file (stock parameters and
 * unlimited bandwidth), QEMU background-snapshot to a file, and for restores `-incoming
 * "exec:cat <file>"`; against tlc live (time-bound), cow, auto, and lazy and eager restore.
 *
 *   npm run bench [-- --quick] [-- --sizes 256,1024 --reps 3 --timeout-s 60]
 *   (--quick: one 256 MiB guest, two workloads, one repetition: a few minutes)
 *
 * Writes bench/out/compare-<timestamp>.json and .html (see report.ts).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type CheckpointProgress, takeCheckpoint } from '../checkpoint/take.js';
import type { Manifest } from '../store/manifest.js';
import { CheckpointStore } from '../store/store.js';
import { restoreCheckpoint } from '../restore/restore.js';
import { ConsoleTail } from '../vm/console.js';
import { launchQemu } from '../vm/launch.js';
import { isHeartbeatLine, killVm, startVm, stopVm } from '../vm/manager.js';
import { kill, waitExit } from '../vm/process.js';
import { loadVm, runtimePaths } from '../vm/registry.js';
import type {
  CheckpointMethod,
  CheckpointRun,
  CompareResults,
  RestoreRun,
  TimelineSample,
} from './compare-types.js';
import { runQemuMigration } from './baseline.js';
import { measureGuestWindow, runMeasured } from './measure.js';
import { renderReport } from './report.js';
import { summaryMarkdown } from './summary.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const quick = process.argv.includes('--quick');

function argValue(flag: string): string | undefined {
  const i = process.argv.indexOf(flag);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

/** `--sizes 256,1024` narrows the guest sizes; `--timeout-s 30` the baselines' time limit. */
const SIZES_MIB = (argValue('--sizes') ?? (quick ? '256' : '256,1024,4096')).split(',').map(Number);
const REPS = Number(argValue('--reps') ?? (quick ? 1 : 3));
const BASELINE_TIMEOUT_MS = Number(argValue('--timeout-s') ?? (quick ? 10 : 60)) * 1000;
const TLC_BIN = path.resolve(import.meta.dirname, '..', '..', '..', 'bin', 'tlc.js');
const MiB = 1024 * 1024;

function workloadsFor(ramMiB: number): string[] {
  const small = Math.round(ramMiB * 0.25);
  const large = Math.round(ramMiB * 0.6);
  if (quick) return ['idle', `dirty:${small}:random`];
  return [
    'idle',
    ...['random', 'stream', 'hotcold'].flatMap((p) => [`dirty:${small}:${p}`, `dirty:${large}:${p}`]),
  ];
}

const workspace = benchWorkspace('compare');
const base = workspace.base;
const store = new CheckpointStore();
const files = path.join(base, 'files');
fs.mkdirSync(files, { recursive: true });

/** One QEMU-only checkpoint to a file; `cont` afterwards as a user would. */
async function qemuToFile(
  vm: string,
  method: CheckpointMethod,
  file: string,
): Promise<
  Omit<CheckpointRun, 'ramMiB' | 'workload' | 'method' | 'rep' | 'guestMaxStallMs' | 'guestRateRatio'>
> {
  const r = await runQemuMigration(vm, {
    // The kvm-tlc manual's way: migrate to dd writing the file.
    uri: `exec:dd of=${file} bs=1M status=none`,
    maxBandwidthBps: method === 'QEMU live (stock)' ? 128 * MiB : 1024 ** 4,
    backgroundSnapshot: method === 'QEMU background-snapshot',
    stopFirst: method === 'stop and save',
    timeoutMs: BASELINE_TIMEOUT_MS,
  });
  if (!r.finished) return r.error ? { finished: false } : { finished: false, bytesSent: r.bytesSent };
  return {
    finished: true,
    totalMs: r.wallMs,
    // Stop-and-save keeps the VM stopped throughout: its downtime is the whole save.
    qemuDowntimeMs: method === 'stop and save' ? r.wallMs : (r.qemuDowntimeMs ?? 0),
    bytesSent: r.bytesSent,
    bytesStored: fs.statSync(file).size,
    durableMs: r.wallMs,
  };
}

/** A tlc checkpoint through the real CLI (its own process, so its peak memory is measurable). */
async function tlcCheckpoint(
  vm: string,
  mode: 'live' | 'cow' | 'auto',
): Promise<{ run: Partial<CheckpointRun>; id?: string }> {
  const r = await runMeasured(process.execPath, [TLC_BIN, 'checkpoint', vm, '--mode', mode, '--json']);
  if (r.code !== 0) return { run: { finished: false } };
  const m = JSON.parse(r.stdout) as Manifest;
  return {
    id: m.id,
    run: {
      finished: true,
      totalMs: m.metrics.totalMs,
      ...(m.metrics.qemuDowntimeMs !== undefined ? { qemuDowntimeMs: m.metrics.qemuDowntimeMs } : {}),
      bytesSent: m.metrics.bytesReceived,
      bytesStored: m.metrics.bytesStored,
      durableMs: m.metrics.durableMs,
      peakRssMiB: r.peakRss / MiB,
    },
  };
}

async function restoreByExecCat(
  vm: string,
  file: string,
  name: string,
): Promise<Omit<RestoreRun, 'ramMiB' | 'workload' | 'rep'>> {
  const spec = { ...loadVm(vm).spec, name };
  const dir = path.join(base, 'home', 'vms', name);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const paths = runtimePaths(name);
  fs.rmSync(paths.consoleLog, { force: true });
  const launched = await launchQemu(
    spec,
    { ...paths, incoming: `exec:cat ${file}` },
    { logFile: path.join(dir, 'qemu.log') },
  );
  try {
    let timeToRunningMs = 0;
    for (;;) {
      const s = await launched.qmp.execute('query-status');
      if (s.status === 'running') {
        timeToRunningMs = performance.now() - launched.spawnedAt;
        break;
      }
      // A stopped VM's stream lands paused: resume it, as tlc does for stop-mode checkpoints.
      if (s.status === 'paused' && (await launched.qmp.execute('query-migrate')).status === 'completed') {
        await launched.qmp.execute('cont');
      }
      await sleep(2);
    }
    await new ConsoleTail(paths.consoleLog).waitFor(isHeartbeatLine, {
      timeoutMs: 30_000,
      onTimeout: () => new Error('no heartbeat'),
    });
    return {
      method: 'exec:cat <file>',
      timeToRunningMs,
      timeToHeartbeatMs: performance.now() - launched.spawnedAt,
    };
  } finally {
    launched.qmp.close();
    kill(launched.process);
    await waitExit(launched.process, 3000);
  }
}

async function restoreByTlc(
  id: string,
  eager: boolean,
  name: string,
): Promise<Omit<RestoreRun, 'ramMiB' | 'workload' | 'rep'>> {
  const r = await restoreCheckpoint({ ref: id, store, name, eager, waitHeartbeat: true });
  await stopVm(name, { force: true });
  return {
    method: eager ? 'tlc eager' : 'tlc lazy',
    timeToRunningMs: r.timeToRunningMs,
    ...(r.timeToHeartbeatMs !== undefined ? { timeToHeartbeatMs: r.timeToHeartbeatMs } : {}),
  };
}

async function main(): Promise<void> {
  const results: CompareResults = {
    stamp: {
      ...machineStamp(),
      accel: 'tcg',
      preset: quick ? 'quick' : 'full',
      repetitions: REPS,
    },
    checkpoints: [],
    restores: [],
    notes: [
      `Baselines that run longer than ${BASELINE_TIMEOUT_MS / 1000} s are cancelled and recorded as not finished.`,
      'Downtime is QEMU-reported; for stop-and-save it is the whole save, as the VM is stopped throughout.',
      "tlc runs through the CLI in its own process; its peak memory is that process's VmHWM.",
      "Guest rate ratio: the dirty workload's own reported write rate during the checkpoint over the second before.",
    ],
  };
  const methods: CheckpointMethod[] = [
    'tlc live',
    'tlc cow',
    'tlc auto',
    'stop and save',
    'QEMU live (stock)',
    'QEMU live (unlimited)',
    'QEMU background-snapshot',
  ];
  for (const ramMiB of SIZES_MIB) {
    if (ramMiB * MiB * 3 > os.freemem()) {
      results.notes.push(
        `${ramMiB} MiB guests skipped: the machine has ${Math.round(os.freemem() / MiB)} MiB free (needs guest, page table and page cache).`,
      );
      continue;
    }
    for (const workload of workloadsFor(ramMiB)) {
      const vm = `cmp-${ramMiB}-${workload.replace(/:/g, '-')}`;
      process.stderr.write(`\n== ${ramMiB} MiB, ${workload}\n`);
      const started = await startVm({
        name: vm,
        memMiB: ramMiB,
        workload,
        accel: 'tcg',
        bootTimeoutMs: 300_000,
      });
      const consoleLog = started.record.paths.consoleLog;
      await sleep(1000);
      let lastTlcLive: string | undefined;
      let lastStopFile: string | undefined;
      for (let rep = 1; rep <= REPS; rep++) {
        for (const method of methods) {
          const file = path.join(files, `${vm}-${rep}-${method.replace(/\W+/g, '_')}.qevm`);
          const w = await measureGuestWindow(consoleLog, async () =>
            method.startsWith('tlc')
              ? tlcCheckpoint(vm, method.slice(4) as 'live' | 'cow' | 'auto')
              : { run: await qemuToFile(vm, method, file), id: undefined },
          );
          const run: CheckpointRun = {
            ramMiB,
            workload,
            method,
            rep,
            finished: false,
            ...w.result.run,
            guestMaxStallMs: w.guest.maxStallMs,
            ...(w.guest.rateRatio !== null ? { guestRateRatio: w.guest.rateRatio } : {}),
          };
          results.checkpoints.push(run);
          process.stderr.write(`${JSON.stringify(run)}\n`);
          if (method === 'tlc live' && w.result.id) {
            if (lastTlcLive) store.remove(lastTlcLive);
            lastTlcLive = w.result.id;
          } else if (w.result.id) {
            store.remove(w.result.id);
          }
          if (method === 'stop and save' && run.finished) {
            if (lastStopFile) fs.rmSync(lastStopFile, { force: true });
            lastStopFile = file;
          } else {
            fs.rmSync(file, { force: true });
          }
        }
      }
      if (!results.timeline && workload !== 'idle') {
        const samples: TimelineSample[] = [];
        const t = await takeCheckpoint({
          vm,
          mode: 'live',
          store,
          onProgress: (p: CheckpointProgress) =>
            samples.push({
              t: p.elapsedMs,
              stage: p.stage,
              bytes: p.bytesReceived,
              dirtyPagesRate: p.dirtyPagesRate ?? 0,
            }),
        });
        results.timeline = {
          label: `tlc live, ${ramMiB} MiB, ${workload}`,
          samples,
          downtimeMs: t.manifest.metrics.stage3.downtimeMs,
        };
        store.remove(t.id);
      }
      await killVm(vm);
      for (let rep = 1; rep <= REPS; rep++) {
        const tag = { ramMiB, workload, rep };
        if (lastTlcLive) {
          results.restores.push({ ...tag, ...(await restoreByTlc(lastTlcLive, false, `${vm}-lazy`)) });
          results.restores.push({ ...tag, ...(await restoreByTlc(lastTlcLive, true, `${vm}-eager`)) });
        }
        if (lastStopFile)
          results.restores.push({ ...tag, ...(await restoreByExecCat(vm, lastStopFile, `${vm}-cat`)) });
      }
      if (lastTlcLive) store.remove(lastTlcLive);
      if (lastStopFile) fs.rmSync(lastStopFile, { force: true });
    }
  }
  const date = String(results.stamp.date);
  const json = saveResult('compare', date, 'json', JSON.stringify(results, null, 2) + '\n');
  const html = saveResult('compare', date, 'html', renderReport(results));
  process.stderr.write(`saved ${json} and ${html}\n`);
  process.stdout.write(summaryMarkdown(results));
}

await workspace.run(main);
