/**
 * Incremental checkpoints, measured on real guests:
 *
 * - bytes stored per checkpoint against bytes of the pages that changed since its parent (from
 *   the two checkpoints' page hashes), for idle, `dirty` random/stream/hotcold and the sub-page
 *   `bytes` pattern (with sub-page deltas on and off), at 25% and 60% working sets;
 * - tlc's peak RSS against guest RAM size;
 * - a full and an incremental tlc checkpoint (to durable) against QEMU writing its stream to a file.
 *
 *   npm run bench:incr [-- --quick] [-- --mem 256 --interval-s 5,30 --count 4 --rss-sizes 256,1024,4096 --restore-mem 1024 --parts series,sizes,restore]
 *
 * Writes bench/out/incr-<timestamp>.json and prints a table.
 */
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { HASHES_HEADER_BYTES, HASH_BYTES } from '../store/page-hash.js';
import { type Manifest, PAGE_SIZE } from '../store/manifest.js';
import { CheckpointStore, type StoredCheckpoint } from '../store/store.js';
import { killVm, startVm } from '../vm/manager.js';
import { restoreCheckpoint } from '../restore/restore.js';
import { runQemuMigration } from './baseline.js';
import { runMeasured } from './measure.js';
import { benchWorkspace, saveResult } from './workspace.js';

const quick = process.argv.includes('--quick');
function argValue(flag: string): string | undefined {
  const i = process.argv.indexOf(flag);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
const MEM_MIB = Number(argValue('--mem') ?? 256);
const INTERVALS_S = (argValue('--interval-s') ?? (quick ? '5' : '5,30')).split(',').map(Number);
const COUNT = Number(argValue('--count') ?? (quick ? 3 : 4));
const RSS_SIZES = (argValue('--rss-sizes') ?? (quick ? '256,1024' : '256,1024,4096')).split(',').map(Number);
const TLC_BIN = path.resolve(import.meta.dirname, '..', '..', '..', 'bin', 'tlc.js');
const MiB = 1024 * 1024;
/** `--parts series,sizes,restore` (default all) runs only some of the measurements. */
const PARTS = new Set((argValue('--parts') ?? 'series,sizes,restore').split(','));

const workspace = benchWorkspace('incr');
const store = new CheckpointStore();

function workloads(): { workload: string; deltas: boolean }[] {
  const small = Math.round(MEM_MIB * 0.25);
  const large = Math.round(MEM_MIB * 0.6);
  const sizes = quick ? [small] : [small, large];
  return [
    { workload: 'idle', deltas: true },
    ...sizes.flatMap((n) =>
      ['random', 'stream', 'hotcold'].map((p) => ({ workload: `dirty:${n}:${p}`, deltas: true })),
    ),
    ...sizes.flatMap((n) => [
      { workload: `dirty:${n}:bytes`, deltas: true },
      { workload: `dirty:${n}:bytes`, deltas: false },
    ]),
  ];
}

interface SeriesRow {
  workload: string;
  deltas: boolean;
  intervalS: number;
  index: number;
  /** Bytes of RAM pages whose content differs from the parent's. */
  changedBytes: number;
  /** Bytes of this checkpoint's RAM images and deltas (allocated). */
  storedRamBytes: number;
  /** Everything the checkpoint stores (hashes, sums, device state included). */
  storedBytes: number;
  ratio: number;
  deltaPages: number;
  durableMs: number;
  peakRssMiB: number;
  /** Live mode on TCG: the fix-up comparing guest RAM with what was received (guest stopped). */
  tcgFixup?: { pages: number; ms: number };
}

function hashesOf(c: StoredCheckpoint, block: number): BigUint64Array {
  const b = c.manifest.blocks[block];
  const data = fs.readFileSync(path.join(c.dir, b?.hashesFile ?? ''));
  const copy = new Uint8Array(data.length - HASHES_HEADER_BYTES);
  copy.set(data.subarray(HASHES_HEADER_BYTES));
  return new BigUint64Array(copy.buffer, 0, copy.length / HASH_BYTES);
}

function changedBytes(c: StoredCheckpoint, parent: StoredCheckpoint): number {
  let pages = 0;
  c.manifest.blocks.forEach((_, i) => {
    const a = hashesOf(c, i);
    const b = hashesOf(parent, i);
    for (let p = 0; p < a.length; p++) if (a[p] !== b[p]) pages++;
  });
  return pages * PAGE_SIZE;
}

function storedRamBytes(c: StoredCheckpoint): number {
  let n = 0;
  for (const b of c.manifest.blocks) {
    n += fs.statSync(path.join(c.dir, b.file)).blocks * 512;
    if (b.deltaFile) n += fs.statSync(path.join(c.dir, b.deltaFile)).blocks * 512;
  }
  return n;
}

async function checkpoint(
  vm: string,
  args: string[],
): Promise<{ ckpt: StoredCheckpoint; wallMs: number; peakRss: number }> {
  const t0 = performance.now();
  const run = await runMeasured(process.execPath, [TLC_BIN, 'checkpoint', vm, '--json', ...args]);
  const wallMs = performance.now() - t0;
  if (run.code !== 0) throw new Error(`tlc checkpoint ${vm} exited with ${run.code}`);
  const m = JSON.parse(run.stdout) as Manifest;
  return { ckpt: store.exact(m.id), wallMs, peakRss: run.peakRss };
}

async function series(workload: string, deltas: boolean, intervalS: number): Promise<SeriesRow[]> {
  const vm = `b${Date.now().toString(36)}`;
  await startVm({ name: vm, memMiB: MEM_MIB, workload, accel: 'tcg' });
  const rows: SeriesRow[] = [];
  try {
    await sleep(3000);
    let parent: StoredCheckpoint | undefined;
    for (let i = 0; i < COUNT; i++) {
      const { ckpt, peakRss } = await checkpoint(vm, ['--mode', 'live', ...(deltas ? [] : ['--no-deltas'])]);
      if (parent) {
        const changed = changedBytes(ckpt, parent);
        const ram = storedRamBytes(ckpt);
        rows.push({
          workload,
          deltas,
          intervalS,
          index: i,
          changedBytes: changed,
          storedRamBytes: ram,
          storedBytes: ckpt.manifest.storedBytes ?? 0,
          ratio: changed > 0 ? ram / changed : ram === 0 ? 1 : Infinity,
          deltaPages: ckpt.manifest.blocks.reduce((n, b) => n + (b.deltaPages ?? 0), 0),
          durableMs: ckpt.manifest.metrics.durableMs,
          peakRssMiB: peakRss / MiB,
          ...(ckpt.manifest.metrics.tcgFixup ? { tcgFixup: ckpt.manifest.metrics.tcgFixup } : {}),
        });
      }
      parent = ckpt;
      if (i < COUNT - 1) await sleep(intervalS * 1000);
    }
  } finally {
    await killVm(vm).catch(() => undefined);
    store.removeAllOf(vm);
  }
  return rows;
}

interface SizeRow {
  ramMiB: number;
  full: { peakRssMiB: number; durableWallMs: number; receiveMBs: number };
  incremental: { peakRssMiB: number; durableWallMs: number; receiveMBs: number };
  qemuToFileMs: number;
}

/** Peak RSS and time to durable against guest RAM, beside QEMU writing its own stream to a file. */
async function bySize(ramMiB: number): Promise<SizeRow> {
  const vm = `s${ramMiB}`;
  await startVm({
    name: vm,
    memMiB: ramMiB,
    workload: `memverify:${Math.round(ramMiB / 2)}:2000`,
    accel: 'tcg',
  });
  try {
    await sleep(Math.max(3000, ramMiB * 4));
    const rate = (c: StoredCheckpoint): number => {
      const x = c.manifest.metrics;
      return x.bytesReceived / 1e6 / ((x.totalMs - x.setupMs) / 1000);
    };
    const full = await checkpoint(vm, ['--mode', 'stop', '--full']);
    const incr = await checkpoint(vm, ['--mode', 'stop']);
    const file = path.join(workspace.base, `${vm}.stream`);
    const qemu = await runQemuMigration(vm, {
      uri: `exec:dd of=${file} bs=1M status=none conv=fdatasync`,
      maxBandwidthBps: 1024 ** 4,
      stopFirst: true,
      timeoutMs: 600_000,
    });
    fs.rmSync(file, { force: true });
    return {
      ramMiB,
      full: {
        peakRssMiB: full.peakRss / MiB,
        durableWallMs: full.ckpt.manifest.metrics.durableMs,
        receiveMBs: rate(full.ckpt),
      },
      incremental: {
        peakRssMiB: incr.peakRss / MiB,
        durableWallMs: incr.ckpt.manifest.metrics.durableMs,
        receiveMBs: rate(incr.ckpt),
      },
      qemuToFileMs: qemu.wallMs,
    };
  } finally {
    await killVm(vm).catch(() => undefined);
    store.removeAllOf(vm);
  }
}

interface RestoreRow {
  ramMiB: number;
  chainLength: number;
  lazyMs: number;
  eagerMs: number;
}

/** Restore time (the call until the guest runs) against the length of the chain behind it. */
async function restoreByChain(ramMiB: number): Promise<RestoreRow[]> {
  const vm = `r${ramMiB}`;
  await startVm({
    name: vm,
    memMiB: ramMiB,
    workload: `memverify:${Math.round(ramMiB / 2)}:2000`,
    accel: 'tcg',
  });
  const ckpts: StoredCheckpoint[] = [];
  try {
    await sleep(Math.max(3000, ramMiB * 4));
    for (let i = 0; i < 5; i++) {
      ckpts.push((await checkpoint(vm, ['--mode', 'live'])).ckpt);
      await sleep(1000);
    }
  } finally {
    await killVm(vm).catch(() => undefined);
  }
  const rows: RestoreRow[] = [];
  for (const [i, c] of ckpts.entries()) {
    const times: number[] = [];
    for (const eager of [false, true]) {
      const name = `${vm}-${i}-${eager ? 'e' : 'l'}`;
      const t0 = performance.now();
      await restoreCheckpoint({ ref: c.id, store, name, eager });
      times.push(performance.now() - t0);
      await killVm(name).catch(() => undefined);
    }
    rows.push({ ramMiB, chainLength: i + 1, lazyMs: times[0] ?? 0, eagerMs: times[1] ?? 0 });
  }
  store.removeAllOf(vm);
  return rows;
}

async function main(): Promise<void> {
  const started = new Date().toISOString();
  const rows: SeriesRow[] = [];
  for (const intervalS of PARTS.has('series') ? INTERVALS_S : []) {
    for (const { workload, deltas } of workloads()) {
      const got = await series(workload, deltas, intervalS);
      rows.push(...got);
      for (const r of got)
        process.stdout.write(
          `${r.workload.padEnd(20)} deltas=${r.deltas ? 'on ' : 'off'} every ${r.intervalS}s #${r.index}: changed ${(r.changedBytes / MiB).toFixed(2)} MiB, stored ${(r.storedRamBytes / MiB).toFixed(2)} MiB, ratio ${r.ratio.toFixed(3)}, ${r.deltaPages} delta pages, durable ${r.durableMs.toFixed(0)} ms, peak RSS ${r.peakRssMiB.toFixed(0)} MiB${r.tcgFixup ? `, TCG fix-up ${r.tcgFixup.pages} pages in ${r.tcgFixup.ms.toFixed(0)} ms` : ''}\n`,
        );
    }
  }
  const sizes: SizeRow[] = [];
  for (const ramMiB of PARTS.has('sizes') ? RSS_SIZES : []) {
    const s = await bySize(ramMiB);
    sizes.push(s);
    process.stdout.write(
      `${ramMiB} MiB guest: full checkpoint peak RSS ${s.full.peakRssMiB.toFixed(0)} MiB, receive ${s.full.receiveMBs.toFixed(0)} MB/s, durable ${s.full.durableWallMs.toFixed(0)} ms; ` +
        `incremental peak RSS ${s.incremental.peakRssMiB.toFixed(0)} MiB, receive ${s.incremental.receiveMBs.toFixed(0)} MB/s, durable ${s.incremental.durableWallMs.toFixed(0)} ms; ` +
        `QEMU stop + stream to file (fdatasync) ${s.qemuToFileMs.toFixed(0)} ms\n`,
    );
  }
  const restores = PARTS.has('restore')
    ? await restoreByChain(Number(argValue('--restore-mem') ?? 1024))
    : [];
  for (const r of restores)
    process.stdout.write(
      `restore of a ${r.ramMiB} MiB guest from a chain of ${r.chainLength}: lazy ${r.lazyMs.toFixed(0)} ms, eager ${r.eagerMs.toFixed(0)} ms (call to running)\n`,
    );
  const file = saveResult(
    'incr',
    started,
    'json',
    JSON.stringify({ started, memMiB: MEM_MIB, rows, sizes, restores }, null, 2),
  );
  process.stdout.write(`wrote ${file}\n`);
}

await workspace.run(main);
