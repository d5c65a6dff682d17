/**
 * Time-bound live checkpoint benchmark: tlc live (default deadline) and tlc cow against
 * stop-and-save, QEMU pre-copy (stock: 128 MiB/s, 300 ms; and unlimited bandwidth) and QEMU's
 * background snapshot, side by side in one run, on an allocate-then-rewrite guest
 * (`memverify:<MiB>:0:grow`), on a quiet host and beside a CPU hog.
 *
 *   npm run bench:timebound [-- --sizes 1024,4096 --reps 3 --loads quiet,hog]
 *
 * Per run: deadline met (tlc live), total time, downtime, and the guest work lost measured from
 * the host (the workload's progress counter against host time; see guest-progress.ts). Every
 * method starts from a guest that has run for a while; the first tlc live run of a VM meets the
 * allocation phase. Writes bench/out/timebound-<date>.json and .html.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { takeCheckpoint } from '../checkpoint/take.js';
import { CheckpointStore } from '../store/store.js';
import { startVm, stopVm } from '../vm/manager.js';
import { runQemuMigration } from './baseline.js';
import { measureWorkLost, waitProgress } from './guest-progress.js';
import { type Summary, formatSummary as fmt, optSummary as opt, summarize } from './stats.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

function listArg(name: string, fallback: string): string[] {
  const i = process.argv.indexOf(`--${name}`);
  return (i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback).split(',');
}
const SIZES = listArg('sizes', '1024,4096').map(Number);
const REPS = Number(listArg('reps', '3')[0]);
const LOADS = listArg('loads', 'quiet,hog') as ('quiet' | 'hog')[];
const BASELINE_TIMEOUT_MS = 30_000;

const METHODS = [
  'tlc live',
  'tlc cow',
  'stop and save',
  'QEMU pre-copy (stock)',
  'QEMU pre-copy (unlimited)',
  'QEMU background-snapshot',
] as const;
type Method = (typeof METHODS)[number];
type MethodResult = Omit<
  Run,
  | 'ramMiB'
  | 'load'
  | 'workload'
  | 'rep'
  | 'method'
  | 'workLostMs'
  | 'phaseChange'
  | 'progressRatio'
  | 'windowMs'
>;

interface Run {
  ramMiB: number;
  load: string;
  workload: string;
  rep: number;
  method: Method;
  finished: boolean;
  deadlineMs?: number;
  metDeadline?: boolean;
  totalMs?: number;
  downtimeMs?: number;
  setupMs?: number;
  /** tlc runs: QEMU's own setup-time (setupMs is tlc's, from its clock start). */
  qemuSetupMs?: number;
  warmUpMs?: number;
  forced?: boolean;
  maxThrottlePct?: number;
  workLostMs: number | null;
  /** The guest finished its fill inside the window: work lost is not comparable (null). */
  phaseChange: boolean;
  progressRatio: number | null;
  windowMs: number;
}

const workspace = benchWorkspace('timebound');
const store = new CheckpointStore();

async function runMethod(vm: string, method: Method): Promise<MethodResult> {
  if (method === 'tlc live' || method === 'tlc cow') {
    const ckpt = await takeCheckpoint({ vm, mode: method === 'tlc live' ? 'live' : 'cow', store });
    const m = ckpt.manifest.metrics;
    store.remove(ckpt.id);
    return {
      finished: true,
      totalMs: m.totalMs,
      downtimeMs: m.stage3.downtimeMs,
      setupMs: m.setupMs,
      ...(m.qemuSetupMs !== undefined ? { qemuSetupMs: m.qemuSetupMs } : {}),
      ...(m.warmUpMs !== undefined ? { warmUpMs: m.warmUpMs } : {}),
      ...(m.control
        ? {
            deadlineMs: m.control.deadlineMs,
            metDeadline: m.control.metDeadline,
            forced: Boolean(m.control.forcedSwitchover),
            maxThrottlePct: m.control.maxThrottlePct,
          }
        : {}),
    };
  }
  const r = await runQemuMigration(vm, {
    uri: 'exec:cat > /dev/null',
    maxBandwidthBps: method === 'QEMU pre-copy (stock)' ? 128 * 1024 * 1024 : 1024 ** 4,
    timeoutMs: BASELINE_TIMEOUT_MS,
    stopFirst: method === 'stop and save',
    backgroundSnapshot: method === 'QEMU background-snapshot',
  });
  return {
    finished: r.finished,
    totalMs: r.finished ? (r.qemuTotalMs ?? r.wallMs) : r.wallMs,
    ...(r.qemuSetupMs !== undefined ? { setupMs: r.qemuSetupMs } : {}),
    ...(method === 'stop and save'
      ? { downtimeMs: r.wallMs }
      : r.qemuDowntimeMs !== undefined
        ? { downtimeMs: r.qemuDowntimeMs }
        : {}),
  };
}

function cpuHog(): ChildProcess {
  return spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore' });
}

async function main(): Promise<void> {
  const runs: Run[] = [];
  for (const ramMiB of SIZES) {
    for (const load of LOADS) {
      const workload = `memverify:${Math.floor(ramMiB * 0.75)}:0:grow`;
      const vm = `tb-${ramMiB}-${load}`;
      process.stderr.write(`\n== ${ramMiB} MiB guest, ${workload}, ${load} host\n`);
      const started = await startVm({
        name: vm,
        memMiB: ramMiB,
        workload,
        accel: 'tcg',
        bootTimeoutMs: 180_000,
      });
      const consoleLog = started.record.paths.consoleLog;
      await waitProgress(consoleLog, 60_000);
      const hog = load === 'hog' ? cpuHog() : undefined;
      try {
        for (let rep = 1; rep <= REPS; rep++) {
          for (const method of METHODS) {
            const w = await measureWorkLost(consoleLog, () => runMethod(vm, method));
            const run: Run = {
              ramMiB,
              load,
              workload,
              rep,
              method,
              ...w.result,
              workLostMs: w.work.lostMs,
              phaseChange: w.work.phaseChange,
              progressRatio: w.work.progressRatio,
              windowMs: w.work.windowMs,
            };
            runs.push(run);
            process.stderr.write(`${JSON.stringify(run)}\n`);
          }
        }
      } finally {
        if (hog?.pid !== undefined) hog.kill('SIGKILL');
        await stopVm(vm, { force: true });
      }
    }
  }
  const stamp = { ...machineStamp(), accel: 'tcg', reps: REPS, baselineTimeoutMs: BASELINE_TIMEOUT_MS };
  const json = saveResult('timebound', stamp.date, 'json', `${JSON.stringify({ stamp, runs }, null, 2)}\n`);
  const html = saveResult('timebound', stamp.date, 'html', renderHtml(stamp, runs));
  process.stdout.write(`${textTable(runs)}\nsaved ${json} and ${html}\n`);
}

interface Row {
  group: string;
  method: Method;
  met: string;
  total?: Summary;
  downtime?: Summary;
  lost?: Summary;
  forced: string;
  throttle?: Summary;
  setup?: Summary;
}

function rows(runs: Run[]): Row[] {
  const out: Row[] = [];
  const groups = [...new Set(runs.map((r) => `${r.ramMiB} MiB · ${r.load} host`))];
  for (const group of groups) {
    for (const method of METHODS) {
      const rs = runs.filter((r) => `${r.ramMiB} MiB · ${r.load} host` === group && r.method === method);
      if (rs.length === 0) continue;
      const done = rs.filter((r) => r.finished);
      const num = (f: (r: Run) => number | null | undefined): Summary | undefined =>
        summarize(done.map(f).filter((v): v is number => typeof v === 'number'));
      out.push({
        group,
        method,
        met:
          method === 'tlc live'
            ? `${rs.filter((r) => r.metDeadline).length}/${rs.length}`
            : `${done.length}/${rs.length} finished`,
        ...opt(
          'total',
          num((r) => r.totalMs),
        ),
        ...opt(
          'downtime',
          num((r) => r.downtimeMs),
        ),
        ...opt(
          'lost',
          num((r) => r.workLostMs),
        ),
        ...opt(
          'throttle',
          num((r) => r.maxThrottlePct),
        ),
        ...opt(
          'setup',
          num((r) => r.setupMs),
        ),
        forced: method === 'tlc live' ? `${rs.filter((r) => r.forced).length}/${rs.length}` : '',
      });
    }
  }
  return out;
}

function textTable(runs: Run[]): string {
  const lines = [
    'group | method | deadline met / finished | total ms | downtime ms | guest work lost ms | forced | max throttle % | setup ms',
  ];
  for (const r of rows(runs))
    lines.push(
      [
        r.group,
        r.method,
        r.met,
        fmt(r.total),
        fmt(r.downtime),
        fmt(r.lost),
        r.forced,
        fmt(r.throttle),
        fmt(r.setup),
      ].join(' | '),
    );
  return lines.join('\n');
}

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function renderHtml(stamp: Record<string, unknown>, runs: Run[]): string {
  const body = rows(runs)
    .map(
      (r) =>
        `<tr><td>${esc(r.group)}</td><td>${esc(r.method)}</td><td>${esc(r.met)}</td><td>${fmt(r.total)}</td>` +
        `<td>${fmt(r.downtime)}</td><td>${fmt(r.lost)}</td><td>${esc(r.forced)}</td><td>${fmt(r.throttle)}</td><td>${fmt(r.setup)}</td></tr>`,
    )
    .join('\n');
  return `<!doctype html><meta charset="utf-8"><title>tlc time-bound benchmark</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:nth-child(-n+3),th{text-align:left}</style>
<h1>tlc time-bound live checkpoints</h1>
<p>Median (min–max) over ${REPS} repetitions. Guest: memverify grow (allocates 75% of RAM, then rewrites it), TCG.
"hog" runs a CPU-bound shell loop beside the VM. Guest work lost: host milliseconds of guest progress lost during the
method's window (from its start until it returned), against the guest's rate over the 2 s before.
Downtime: tlc = STOP→RESUME events (includes the TCG fix-up); QEMU = its reported downtime; stop and save = the whole run.</p>
<pre>${esc(JSON.stringify(stamp, null, 1))}</pre>
<table><tr><th>guest · host</th><th>method</th><th>deadline met / finished</th><th>total ms</th><th>downtime ms</th><th>guest work lost ms</th><th>forced</th><th>max throttle %</th><th>setup ms</th></tr>
${body}
</table>`;
}

await workspace.run(main);
