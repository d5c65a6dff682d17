/**
 * Disk-consistent checkpoint benchmark: what saving disks costs, side by side in one run.
 *
 *   npm run bench:disk [-- --reps N]
 *
 * Two guests with the same RAM and memory workload, one also appending fsynced records to a qcow2
 * disk (diskverify), checkpointed alternately in every mode. Reports per mode, as medians with
 * min-max: the downtime with and without the disk, the pause the disk step itself adds (ms the VM
 * stayed stopped for it), the bytes an incremental disk layer stores against the bytes of the
 * clusters that changed, and lazy restore time-to-running with and without the disk.
 * Writes bench/out/disk-<timestamp>.json and .html.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { takeCheckpoint } from '../checkpoint/take.js';
import { restoreCheckpoint } from '../restore/restore.js';
import type { CheckpointMode } from '../store/manifest.js';
import { CheckpointStore } from '../store/store.js';
import { killVm, startVm } from '../vm/manager.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const repsArg = process.argv.indexOf('--reps');
const REPS = repsArg > 0 ? Number(process.argv[repsArg + 1]) : 5;
const MEM_MIB = 256;
const MODES: CheckpointMode[] = ['live', 'cow', 'stop'];
const workspace = benchWorkspace('disk');
const store = new CheckpointStore();

interface Sample {
  mode: CheckpointMode;
  disk: boolean;
  downtimeMs: number;
  diskPauseMs?: number;
  layerBytes?: number;
  changedBytes?: number;
  incremental?: boolean;
  restoreMs: number;
}

function ext4Qcow2(file: string, mib: number): void {
  const raw = `${file}.raw`;
  fs.writeFileSync(raw, '');
  fs.truncateSync(raw, mib * 2 ** 20);
  execFileSync('mkfs.ext4', ['-q', '-F', raw], {
    env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` },
  });
  execFileSync('qemu-img', ['convert', '-O', 'qcow2', raw, file]);
  fs.rmSync(raw);
}

async function measure(vm: string, mode: CheckpointMode, disk: boolean): Promise<Sample> {
  const ckpt = await takeCheckpoint({ vm, mode, store });
  const m = ckpt.manifest;
  const d = m.disks?.[0];
  const restored = await restoreCheckpoint({ ref: ckpt.id, store, name: `${vm}-r` });
  await killVm(`${vm}-r`);
  return {
    mode,
    disk,
    downtimeMs: m.metrics.stage3.downtimeMs,
    restoreMs: restored.timeToRunningMs,
    ...(m.metrics.disk ? { diskPauseMs: m.metrics.disk.pauseMs } : {}),
    ...(d
      ? {
          layerBytes: d.layers.reduce((n, l) => n + l.bytes, 0),
          changedBytes: d.copiedBytes,
          incremental: Boolean(d.parent),
        }
      : {}),
  };
}

function median(xs: number[]): { median: number; min: number; max: number; n: number } {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
  return { median, min: s[0] ?? NaN, max: s.at(-1) ?? NaN, n: s.length };
}

async function main(): Promise<void> {
  const image = path.join(workspace.base, 'disk.qcow2');
  ext4Qcow2(image, 128);
  await startVm({
    name: 'with-disk',
    memMiB: MEM_MIB,
    workload: 'diskverify:0+memverify:32',
    disks: [{ path: image }],
  });
  await startVm({ name: 'no-disk', memMiB: MEM_MIB, workload: 'memverify:32' });
  await sleep(2000);
  const samples: Sample[] = [];
  for (let rep = 0; rep < REPS; rep++) {
    for (const mode of MODES) {
      for (const [vm, disk] of [
        ['with-disk', true],
        ['no-disk', false],
      ] as const) {
        const s = await measure(vm, mode, disk);
        samples.push(s);
        process.stderr.write(
          `${mode.padEnd(4)} ${disk ? 'disk   ' : 'no disk'} downtime ${s.downtimeMs.toFixed(1)} ms` +
            (s.diskPauseMs !== undefined ? `, disk pause ${s.diskPauseMs} ms` : '') +
            (s.layerBytes !== undefined ? `, layer ${s.layerBytes} B for ${s.changedBytes} B changed` : '') +
            `, restore ${s.restoreMs.toFixed(0)} ms\n`,
        );
        await sleep(500);
      }
    }
  }
  const summary = MODES.map((mode) => {
    const pick = (disk: boolean): Sample[] => samples.filter((s) => s.mode === mode && s.disk === disk);
    const incr = pick(true).filter((s) => s.incremental && s.changedBytes);
    return {
      mode,
      downtimeWithDiskMs: median(pick(true).map((s) => s.downtimeMs)),
      downtimeWithoutDiskMs: median(pick(false).map((s) => s.downtimeMs)),
      diskPauseMs: median(pick(true).map((s) => s.diskPauseMs ?? NaN)),
      incrementalStoredOverChanged: median(incr.map((s) => (s.layerBytes ?? 0) / (s.changedBytes ?? 1))),
      incrementalChangedBytes: median(incr.map((s) => s.changedBytes ?? 0)),
      restoreWithDiskMs: median(pick(true).map((s) => s.restoreMs)),
      restoreWithoutDiskMs: median(pick(false).map((s) => s.restoreMs)),
    };
  });
  const stamp = machineStamp();
  const result = { benchmark: 'disk', machine: stamp, memMiB: MEM_MIB, reps: REPS, summary, samples };
  const json = saveResult('disk', stamp.date, 'json', JSON.stringify(result, null, 2) + '\n');
  const html = saveResult('disk', stamp.date, 'html', renderHtml(result.summary, stamp.revision, stamp.date));
  for (const s of summary) {
    process.stdout.write(
      `${s.mode}: downtime ${s.downtimeWithDiskMs.median.toFixed(1)} ms with disk vs ${s.downtimeWithoutDiskMs.median.toFixed(1)} ms without; ` +
        `disk pause ${s.diskPauseMs.median.toFixed(1)} ms; incremental layer/changed ${s.incrementalStoredOverChanged.median.toFixed(2)} ` +
        `(${(s.incrementalChangedBytes.median / 2 ** 20).toFixed(2)} MiB changed); restore ${s.restoreWithDiskMs.median.toFixed(0)} vs ${s.restoreWithoutDiskMs.median.toFixed(0)} ms\n`,
    );
  }
  process.stdout.write(`saved ${json} and ${html}\n`);
}

function renderHtml(summary: Record<string, unknown>[], revision: string, date: string): string {
  const cell = (v: unknown): string => {
    if (v && typeof v === 'object' && 'median' in v) {
      const m = v as { median: number; min: number; max: number };
      return `${m.median.toFixed(2)} <small>(${m.min.toFixed(2)}–${m.max.toFixed(2)})</small>`;
    }
    return String(v);
  };
  const keys = Object.keys(summary[0] ?? {});
  const rows = summary
    .map((s) => `<tr>${keys.map((k) => `<td>${cell(s[k])}</td>`).join('')}</tr>`)
    .join('\n');
  return `<!doctype html><meta charset="utf-8"><title>tlc disk benchmark</title>
<style>body{font:14px system-ui;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}</style>
<h1>Disk-consistent checkpoints</h1><p>revision ${revision}, ${date}; medians (min–max) over ${REPS} runs, ${MEM_MIB} MiB TCG guests.</p>
<table><tr>${keys.map((k) => `<th>${k}</th>`).join('')}</tr>
${rows}</table>\n`;
}

await workspace.run(main);
