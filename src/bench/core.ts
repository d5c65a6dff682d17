/**
 * Core benchmark for the live checkpoint issue: receiver throughput against `exec:cat > /dev/null`,
 * receiver memory, lazy restore time-to-running for a small and a large guest, and eager restore
 * against `-incoming "exec:cat <file>"`. Everything side by side in one run on the same VMs.
 *
 *   npm run bench:core [-- --quick]
 *
 * Prints a table and writes bench/out/core-<timestamp>.json (stamped with git describe and host).
 */
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { restoreCheckpoint } from '../restore/restore.js';
import { CheckpointStore } from '../store/store.js';
import { connectVm, killVm, startVm, stopVm } from '../vm/manager.js';
import { runQemuMigration, timeIncomingToRunning } from './baseline.js';
import { runMeasured } from './measure.js';
import { summarize } from './stats.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const quick = process.argv.includes('--quick');
const TLC_BIN = path.resolve(import.meta.dirname, '..', '..', '..', 'bin', 'tlc.js');
const REPEATS = quick ? 1 : 3;
const workspace = benchWorkspace('core');
const base = workspace.base;
const store = new CheckpointStore();

function median(values: number[]): number {
  return summarize(values)?.median ?? NaN;
}

function spread(values: number[]): [number, number] {
  const s = summarize(values);
  return s ? [s.min, s.max] : [NaN, NaN];
}

/** QEMU migration into `uri` of a stopped VM; returns bytes/s as QEMU saw it. */
async function qemuMigrate(
  vm: string,
  uri: string,
): Promise<{ bytesPerSec: number; ms: number; bytes: number }> {
  const r = await runQemuMigration(vm, {
    uri,
    maxBandwidthBps: 1024 ** 4,
    stopFirst: true,
    timeoutMs: Infinity,
  });
  if (!r.finished) throw new Error(`migration failed: ${r.error}`);
  const ms = r.qemuTotalMs ?? 1;
  return { bytesPerSec: (r.bytesSent / ms) * 1000, ms, bytes: r.bytesSent };
}

/** What QEMU reports about the migration it finished last (the one into tlc). */
async function lastMigrationRate(vm: string): Promise<{ bytesPerSec: number; ms: number; bytes: number }> {
  const { qmp } = await connectVm(vm);
  try {
    const info = await qmp.execute('query-migrate');
    const bytes = info.ram?.transferred ?? 0;
    const ms = info['total-time'] ?? 1;
    return { bytesPerSec: (bytes / ms) * 1000, ms, bytes };
  } finally {
    qmp.close();
  }
}

/**
 * A stop-mode checkpoint by the real CLI in its own process, so its peak memory (VmHWM: main
 * thread, writer thread, page table) is the receiver's alone.
 */
/**
 * A stop-mode checkpoint by the real CLI in its own process, so its peak memory (VmHWM: main
 * thread, writer thread, page table) is the receiver's alone.
 */
async function tlcStopCheckpoint(vm: string): Promise<{ bytesPerSec: number; peakRss: number; id: string }> {
  const run = await runMeasured(process.execPath, [TLC_BIN, 'checkpoint', vm, '--mode', 'stop', '--json']);
  if (run.code !== 0) throw new Error(`tlc checkpoint exited with ${run.code}`);
  const id = (JSON.parse(run.stdout) as { id: string }).id;
  return { bytesPerSec: (await lastMigrationRate(vm)).bytesPerSec, peakRss: run.peakRss, id };
}

async function main(): Promise<void> {
  const results: Record<string, unknown> = {};
  const sizes = quick ? [256, 1024] : [256, 2048];
  const restore: Record<string, { lazyMs: number[]; eagerMs: number[]; execCatMs: number[] }> = {};
  for (const mem of sizes) {
    const vm = `bench-${mem}`;
    const workMiB = Math.floor(mem / 2);
    process.stderr.write(`booting ${vm} (${mem} MiB, memverify:${workMiB})\n`);
    await startVm({
      name: vm,
      memMiB: mem,
      workload: `memverify:${workMiB}`,
      accel: 'tcg',
      bootTimeoutMs: 180_000,
    });
    await sleep(1000);
    const cat: number[] = [];
    const tlc: number[] = [];
    let peakRss = 0;
    let lastId = '';
    const streamFile = path.join(base, `plain-${mem}.qevm`);
    for (let i = 0; i < REPEATS; i++) {
      cat.push((await qemuMigrate(vm, 'exec:cat > /dev/null')).bytesPerSec);
      const t = await tlcStopCheckpoint(vm);
      tlc.push(t.bytesPerSec);
      peakRss = Math.max(peakRss, t.peakRss);
      lastId = t.id;
    }
    await qemuMigrate(vm, `exec:cat > ${streamFile}`);
    results[`throughput-${mem}`] = {
      execCatMiBps: median(cat) / 2 ** 20,
      tlcMiBps: median(tlc) / 2 ** 20,
      ratio: median(tlc) / median(cat),
      spreadCat: spread(cat).map((v) => v / 2 ** 20),
      spreadTlc: spread(tlc).map((v) => v / 2 ** 20),
      peakRssMiB: peakRss / 2 ** 20,
      guestMiB: mem,
    };
    await killVm(vm);
    restore[mem] = { lazyMs: [], eagerMs: [], execCatMs: [] };
    for (let i = 0; i < REPEATS; i++) {
      const lazy = await restoreCheckpoint({ ref: lastId, store, name: `${vm}-lazy` });
      restore[mem].lazyMs.push(lazy.timeToRunningMs);
      await stopVm(`${vm}-lazy`, { force: true });
      const eager = await restoreCheckpoint({ ref: lastId, store, name: `${vm}-eager`, eager: true });
      restore[mem].eagerMs.push(eager.timeToRunningMs);
      await stopVm(`${vm}-eager`, { force: true });
      restore[mem].execCatMs.push(await timeIncomingToRunning(vm, `${vm}-cat`, `exec:cat ${streamFile}`));
    }
    fs.rmSync(streamFile, { force: true });
  }
  for (const [mem, r] of Object.entries(restore)) {
    results[`restore-${mem}`] = {
      lazyMs: median(r.lazyMs),
      eagerMs: median(r.eagerMs),
      execCatMs: median(r.execCatMs),
      eagerVsExecCat: median(r.eagerMs) / median(r.execCatMs),
      spreads: { lazy: spread(r.lazyMs), eager: spread(r.eagerMs), execCat: spread(r.execCatMs) },
    };
  }
  const [small, large] = sizes.map((m) => (results[`restore-${m}`] as { lazyMs: number }).lazyMs);
  results.lazyLargeVsSmall = (large ?? NaN) / (small ?? NaN);
  const stamp = { ...machineStamp(), repeats: REPEATS };
  const out = { stamp, results };
  const file = saveResult('core', stamp.date, 'json', JSON.stringify(out, null, 2) + '\n');
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
  process.stderr.write(`saved ${file}\n`);
}

await workspace.run(main);
