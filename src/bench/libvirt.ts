/**
 * libvirt benchmark: tlc against libvirt's own save and snapshot on the same libvirt domain,
 * side by side in one run.
 *
 *   npm run bench:libvirt [-- --reps 3 --sizes 256,1024 --workload memverify:32]
 *
 * For each size, one domain booting tlc's bundled guest with memverify (TCG, 1 vCPU, memfd RAM, no
 * disk, no network) is defined, started, adopted (`tlc vm attach --libvirt`) and, per repetition:
 *
 *   1. `tlc checkpoint --mode live`, then `--mode stop` (the CLI, in its own process, with its
 *      defaults: live has a deadline from the RAM size and a 300 ms preferred downtime): downtime is
 *      the manifest's `metrics.stage3.downtimeMs` (`tlc show --json`: QEMU's STOP to RESUME event
 *      times), total time is the CLI's wall time, spawn to exit;
 *   2. `virsh snapshot-create-as DOM NAME --live --memspec file=F,snapshot=external` (no --diskspec:
 *      libvirt refuses one for a domain without disks, see `diskspecProbe`): downtime is QEMU's
 *      STOP to RESUME event times (read through libvirt's monitor passthrough), total is virsh's
 *      wall time; the snapshot's metadata and file are deleted afterwards;
 *   3. `virsh save DOM F`: the guest stops and never resumes (QEMU exits), so its "downtime" is
 *      QEMU's STOP event time to `virsh save` returning (the domain is then shut off; the guest
 *      stays stopped until a restore); total is virsh's wall time;
 *   4. `virsh restore F` of that file, at once: time to running is virsh's wall time (it returns
 *      with the domain running, checked with `virsh domstate`). Steps 3 and 4 together are also
 *      reported as a checkpoint the guest continues after ("virsh save, then virsh restore"):
 *      downtime is step 3's plus virsh restore's wall time;
 *   5. `virsh destroy DOM`, then `tlc restore LIVE --json` of step 1's live checkpoint: tlc writes a
 *      libvirt save image from the checkpoint and runs `virsh restore` on it (eager). Time to
 *      running is the CLI's wall time (spawn to exit: the image is written first) and, reported
 *      beside it, tlc's own `timeToRunningMs` (from `virsh restore` starting to the domain running).
 *
 * After each restore the guest must continue: memverify heartbeats advance (10 new ones within
 * 30 s), count up by one from the checkpoint's, with no corrupt page and no reboot. A restore that
 * does not is counted as failed. Medians with min-max over the repetitions; failures are counted.
 * libvirt's daemons are started here when nothing answers at qemu:///system and stopped by pid at
 * the end; domains, files and the workspace are removed. Writes bench/out/libvirt-<timestamp>.json
 * and .html.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildGuest, defaultGuestCacheDir, guestAppendLine } from '../guest/build.js';
import { scanConsole } from '../guest/heartbeat.js';
import { continuationProblems } from '../guest/observe.js';
import { type LibvirtDaemons, libvirtUnavailable, startLibvirtDaemons } from '../libvirt/daemon.js';
import { LIBVIRT_IMAGES_DIR, guestDomainXml, stageGuestFiles } from '../libvirt/domain-xml.js';
import { LibvirtMonitor } from '../libvirt/monitor.js';
import { domainState, runVirsh, virsh } from '../libvirt/virsh.js';
import type { QmpEvent } from '../qmp/types.js';
import { lastHeartbeatSeq } from '../vm/console.js';
import { barChart } from './report.js';
import { type Summary, summarize } from './stats.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const URI = 'qemu:///system';
const TLC_BIN = path.resolve(import.meta.dirname, '..', '..', '..', 'bin', 'tlc.js');
const argValue = (flag: string): string | undefined => {
  const i = process.argv.indexOf(flag);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const REPS = Number(argValue('--reps') ?? 3);
const SIZES = (argValue('--sizes') ?? '256,1024').split(',').map(Number);
const WORKLOAD = argValue('--workload') ?? 'memverify:32';
/** New heartbeats (memverify prints one every ~100 ms) a restored guest must print. */
const HEARTBEATS_AFTER_RESTORE = 10;
const HEARTBEAT_TIMEOUT_MS = 30_000;
const VIRSH_TIMEOUT_MS = 300_000;

const workspace = benchWorkspace('libvirt');
const base = workspace.base;
const filesDir = path.join(base, 'files');
process.env.XDG_CONFIG_HOME = path.join(base, 'config');

const CHECKPOINT_METHODS = [
  'tlc live',
  'tlc stop',
  'virsh snapshot-create-as --live',
  'virsh save',
  'virsh save, then virsh restore',
] as const;
const RESTORE_METHODS = ['tlc restore (eager, via virsh restore)', 'virsh restore'] as const;
type CheckpointMethod = (typeof CHECKPOINT_METHODS)[number];
type RestoreMethod = (typeof RESTORE_METHODS)[number];

/** The exact commands measured ({DOM}, {VM}, {FILE}, {ID}, {SNAP} filled in per run). */
const COMMANDS: Record<CheckpointMethod | RestoreMethod, string> = {
  'tlc live': 'tlc checkpoint {VM} --mode live --json; downtime from tlc show {ID} --json',
  'tlc stop': 'tlc checkpoint {VM} --mode stop --json; downtime from tlc show {ID} --json',
  'virsh snapshot-create-as --live': `virsh -c ${URI} snapshot-create-as {DOM} {SNAP} --live --memspec file={FILE},snapshot=external`,
  'virsh save': `virsh -c ${URI} save {DOM} {FILE}`,
  'virsh save, then virsh restore': `virsh -c ${URI} save {DOM} {FILE}; virsh -c ${URI} restore {FILE}`,
  'tlc restore (eager, via virsh restore)': `virsh -c ${URI} destroy {DOM} (not timed); tlc restore {ID} --json`,
  'virsh restore': `virsh -c ${URI} restore {FILE} (the file virsh save wrote)`,
};

interface CheckpointSample {
  memMiB: number;
  rep: number;
  method: CheckpointMethod;
  ok: boolean;
  error?: string;
  /** The guest stopped: STOP to RESUME (QEMU's event times); virsh save: STOP to virsh returning. */
  downtimeMs?: number;
  /** Wall time of the command, spawn to exit. */
  totalMs?: number;
  /** tlc: the manifest's own total and durable times. */
  tlcTotalMs?: number;
  tlcDurableMs?: number;
  /** virsh: QEMU's STOP to its MIGRATION completed event (QEMU has sent the last byte to libvirt). */
  stopToStreamDoneMs?: number;
  /** Bytes written: the memory file (virsh) or the checkpoint's stored bytes (tlc). */
  bytes?: number;
  id?: string;
  /** tlc: the manifest's metrics (stages, TCG fix-up, controller). */
  metrics?: unknown;
  /** QEMU events seen during the command (name and ms after the command started). */
  events?: string[];
}

interface RestoreSample {
  memMiB: number;
  rep: number;
  method: RestoreMethod;
  ok: boolean;
  error?: string;
  /** Wall time of the command, spawn to exit (the domain is running when it returns). */
  wallMs?: number;
  /** tlc restore: its own timeToRunningMs (virsh restore start to running). */
  tlcTimeToRunningMs?: number;
  /** From the command's start to the restored guest's first heartbeat on the console. */
  firstHeartbeatMs?: number;
  /**
   * The newest heartbeat seq before the checkpoint (tlc: the manifest's guestHeartbeatSeqBefore,
   * before a live pre-copy began; virsh save: the last one printed before the guest stopped), and
   * the first one after the restore.
   */
  seqBefore?: number;
  firstSeqAfter?: number;
  heartbeatsSeen?: number;
  problems?: string[];
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function fmtMs(ms: number | undefined): string {
  return ms === undefined ? '–' : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

function nowEpochMs(): number {
  return performance.timeOrigin + performance.now();
}

function eventMs(ev: QmpEvent): number | undefined {
  return ev.timestamp ? ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000 : undefined;
}

/** Runs the tlc CLI in its own process; `ms` is spawn to exit. */
function tlc(args: string[]): Promise<{ code: number; stdout: string; stderr: string; ms: number }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [TLC_BIN, ...args],
      { env: process.env, timeout: VIRSH_TIMEOUT_MS, maxBuffer: 64 * 2 ** 20 },
      (err, stdout, stderr) =>
        resolve({
          code: err ? Number((err as { code?: number }).code ?? 1) || 1 : 0,
          stdout,
          stderr,
          ms: performance.now() - t0,
        }),
    );
  });
}

async function waitFor(
  what: string,
  timeoutMs: number,
  ok: () => boolean | Promise<boolean>,
): Promise<number> {
  const t0 = performance.now();
  while (!(await ok())) {
    if (performance.now() - t0 > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(20);
  }
  return performance.now() - t0;
}

/** One domain of one size, and everything the runs on it need. */
class Domain {
  readonly name: string;
  readonly vm: string;
  readonly stageDir: string;
  readonly consoleLog: string;
  attach: unknown;
  constructor(readonly memMiB: number) {
    this.name = `tlc-bench-lv${memMiB}-${process.pid}`;
    this.vm = `lv${memMiB}`;
    this.stageDir = path.join(LIBVIRT_IMAGES_DIR, this.name);
    this.consoleLog = path.join(base, `${this.name}.console.log`);
  }

  async define(): Promise<void> {
    const guest = await stageGuestFiles(
      await buildGuest({ cacheDir: defaultGuestCacheDir() }),
      this.stageDir,
    );
    const xml = guestDomainXml({
      name: this.name,
      memMiB: this.memMiB,
      kernel: guest.kernel,
      initrd: guest.initrd,
      cmdline: guestAppendLine(WORKLOAD),
      consoleLog: this.consoleLog,
      memfd: true,
    });
    const file = path.join(base, `${this.name}.xml`);
    fs.writeFileSync(file, xml);
    await virsh(['define', file], { uri: URI, timeoutMs: 120_000 });
  }

  consoleSize(): number {
    return fs.existsSync(this.consoleLog) ? fs.statSync(this.consoleLog).size : 0;
  }

  /** Boots the domain afresh when it is not running, and (re)adopts it in tlc when tlc's record is stale. */
  async ensureRunning(): Promise<void> {
    if ((await domainState(this.name, { uri: URI })) !== 'running') {
      const offset = this.consoleSize();
      await virsh(['start', this.name], { uri: URI, timeoutMs: 120_000 });
      await waitFor(
        'three heartbeats after boot',
        60_000,
        () => scanConsole(fs.readFileSync(this.consoleLog, 'latin1').slice(offset)).heartbeats.length >= 3,
      );
    }
    const status = await tlc(['vm', 'status', this.vm]);
    if (status.code !== 0) {
      const r = await tlc([
        'vm',
        'attach',
        '--name',
        this.vm,
        '--libvirt',
        this.name,
        '--connect',
        URI,
        '--json',
      ]);
      if (r.code !== 0) throw new Error(`tlc vm attach failed: ${r.stderr.trim()}`);
      this.attach ??= JSON.parse(r.stdout);
    }
  }

  /** Waits until the guest prints a heartbeat newer than the current one (it is running), then 1 s. */
  async settle(): Promise<void> {
    const seq = lastHeartbeatSeq(this.consoleLog) ?? 0;
    await waitFor('the guest to run', 20_000, () => (lastHeartbeatSeq(this.consoleLog) ?? 0) > seq);
    await sleep(1000);
  }

  /** Checks that the guest restored from a checkpoint at `seqBefore` continues, memory verified. */
  async verifyContinues(
    offset: number,
    t0: number,
    seqBefore: number | undefined,
  ): Promise<Pick<RestoreSample, 'firstHeartbeatMs' | 'firstSeqAfter' | 'heartbeatsSeen' | 'problems'>> {
    const scanNew = (): ReturnType<typeof scanConsole> =>
      scanConsole(fs.readFileSync(this.consoleLog, 'latin1').slice(offset));
    const problems: string[] = [];
    let firstHeartbeatMs: number | undefined;
    try {
      await waitFor('a heartbeat from the restored guest', HEARTBEAT_TIMEOUT_MS, () => {
        if (scanNew().heartbeats.length === 0) return false;
        firstHeartbeatMs = performance.now() - t0;
        return true;
      });
      await waitFor(
        `${HEARTBEATS_AFTER_RESTORE} heartbeats from the restored guest`,
        HEARTBEAT_TIMEOUT_MS,
        () => scanNew().heartbeats.length >= HEARTBEATS_AFTER_RESTORE,
      );
    } catch (err) {
      problems.push(errText(err));
    }
    const scan = scanNew();
    problems.push(...continuationProblems(scan, seqBefore));
    return {
      ...(firstHeartbeatMs !== undefined ? { firstHeartbeatMs } : {}),
      ...(scan.heartbeats[0] ? { firstSeqAfter: scan.heartbeats[0].seq } : {}),
      heartbeatsSeen: scan.heartbeats.length,
      problems,
    };
  }

  async cleanup(): Promise<void> {
    await runVirsh(['destroy', this.name], { uri: URI }).catch(() => undefined);
    const snaps = await runVirsh(['snapshot-list', '--name', this.name], { uri: URI }).catch(() => undefined);
    for (const s of snaps?.stdout.split('\n').filter((l) => l.trim()) ?? []) {
      await runVirsh(['snapshot-delete', this.name, s.trim(), '--metadata'], { uri: URI }).catch(
        () => undefined,
      );
    }
    await runVirsh(['undefine', this.name], { uri: URI }).catch(() => undefined);
    await tlc(['rm', '--all', this.vm]);
    fs.rmSync(this.stageDir, { recursive: true, force: true });
    fs.rmSync(`/var/log/libvirt/qemu/${this.name}.log`, { force: true });
  }
}

/** Records QEMU's events (through libvirt's passthrough) while `run` runs. */
async function withEvents<T>(
  dom: Domain,
  run: () => Promise<T>,
  settleMs: number,
): Promise<{ result: T; events: QmpEvent[]; startEpochMs: number }> {
  const monitor = await LibvirtMonitor.connect(dom.name, { uri: URI, timeoutMs: 20_000 });
  const events: QmpEvent[] = [];
  monitor.on('event', (ev: QmpEvent) => events.push(ev));
  try {
    const startEpochMs = nowEpochMs();
    const result = await run();
    await sleep(settleMs); // the event child's last lines
    return { result, events, startEpochMs };
  } finally {
    monitor.close();
  }
}

function eventLog(events: QmpEvent[], startEpochMs: number): string[] {
  return events.map((ev) => {
    const t = eventMs(ev);
    const status = ev.event === 'MIGRATION' ? ` ${String(ev.data?.status)}` : '';
    return `${ev.event}${status} ${t === undefined ? '?' : `+${(t - startEpochMs).toFixed(1)} ms`}`;
  });
}

async function tlcCheckpoint(dom: Domain, rep: number, mode: 'live' | 'stop'): Promise<CheckpointSample> {
  const method: CheckpointMethod = mode === 'live' ? 'tlc live' : 'tlc stop';
  const r = await tlc(['checkpoint', dom.vm, '--mode', mode, '--json']);
  if (r.code !== 0) return { memMiB: dom.memMiB, rep, method, ok: false, error: r.stderr.trim() };
  const id = (JSON.parse(r.stdout) as { id: string }).id;
  const show = await tlc(['show', id, '--json']);
  const m = JSON.parse(show.stdout) as {
    metrics: { stage3: { downtimeMs: number }; totalMs: number; durableMs: number; bytesStored: number };
  };
  return {
    memMiB: dom.memMiB,
    rep,
    method,
    ok: true,
    id,
    downtimeMs: m.metrics.stage3.downtimeMs,
    totalMs: r.ms,
    tlcTotalMs: m.metrics.totalMs,
    tlcDurableMs: m.metrics.durableMs,
    bytes: m.metrics.bytesStored,
    metrics: m.metrics,
  };
}

async function virshSnapshot(dom: Domain, rep: number): Promise<CheckpointSample> {
  const method: CheckpointMethod = 'virsh snapshot-create-as --live';
  const snap = `bench-${rep}`;
  const file = path.join(filesDir, `${dom.name}-${snap}.mem`);
  try {
    const { result, events, startEpochMs } = await withEvents(
      dom,
      () =>
        runVirsh(
          ['snapshot-create-as', dom.name, snap, '--live', '--memspec', `file=${file},snapshot=external`],
          { uri: URI, timeoutMs: VIRSH_TIMEOUT_MS },
        ),
      300,
    );
    if (result.exitCode !== 0) return { memMiB: dom.memMiB, rep, method, ok: false, error: result.error };
    const stop = events.find((e) => e.event === 'STOP');
    const resume = [...events].reverse().find((e) => e.event === 'RESUME');
    const stopMs = stop && eventMs(stop);
    const resumeMs = resume && eventMs(resume);
    const doneMs = streamDoneMs(events);
    const state = await domainState(dom.name, { uri: URI });
    return {
      memMiB: dom.memMiB,
      rep,
      method,
      ok: stopMs !== undefined && resumeMs !== undefined && state === 'running',
      ...(state !== 'running' ? { error: `domain ${state} after the snapshot` } : {}),
      ...(stopMs !== undefined && resumeMs !== undefined ? { downtimeMs: resumeMs - stopMs } : {}),
      ...(stopMs !== undefined && doneMs !== undefined ? { stopToStreamDoneMs: doneMs - stopMs } : {}),
      totalMs: result.ms,
      bytes: fs.statSync(file).size,
      events: eventLog(events, startEpochMs),
    };
  } finally {
    await runVirsh(['snapshot-delete', dom.name, snap, '--metadata'], { uri: URI }).catch(() => undefined);
    fs.rmSync(file, { force: true });
  }
}

/** QEMU's time of its MIGRATION completed event. */
function streamDoneMs(events: QmpEvent[]): number | undefined {
  const done = events.find((e) => e.event === 'MIGRATION' && e.data?.status === 'completed');
  return done && eventMs(done);
}

/**
 * `virsh save`, then at once `virsh restore` of its file; `cont` is the pair seen as a checkpoint
 * the guest continues after: stopped from STOP until virsh restore returned.
 */
async function virshSaveRestore(
  dom: Domain,
  rep: number,
): Promise<{ save: CheckpointSample; restore?: RestoreSample; cont?: CheckpointSample }> {
  const file = path.join(filesDir, `${dom.name}-${rep}.save`);
  try {
    let endEpochMs = 0;
    const { result, events, startEpochMs } = await withEvents(
      dom,
      async () => {
        const r = await runVirsh(['save', dom.name, file], { uri: URI, timeoutMs: VIRSH_TIMEOUT_MS });
        endEpochMs = nowEpochMs();
        return r;
      },
      0, // QEMU has exited by the time virsh save returns: its STOP and MIGRATION events are in
    );
    const method: CheckpointMethod = 'virsh save';
    if (result.exitCode !== 0) {
      return { save: { memMiB: dom.memMiB, rep, method, ok: false, error: result.error } };
    }
    const stop = events.find((e) => e.event === 'STOP');
    const stopMs = stop && eventMs(stop);
    const doneMs = streamDoneMs(events);
    const seqBefore = lastHeartbeatSeq(dom.consoleLog);
    const save: CheckpointSample = {
      memMiB: dom.memMiB,
      rep,
      method,
      ok: stopMs !== undefined,
      ...(stopMs === undefined ? { error: 'no STOP event seen' } : { downtimeMs: endEpochMs - stopMs }),
      ...(stopMs !== undefined && doneMs !== undefined ? { stopToStreamDoneMs: doneMs - stopMs } : {}),
      totalMs: result.ms,
      bytes: fs.statSync(file).size,
      events: eventLog(events, startEpochMs),
    };

    const rmethod: RestoreMethod = 'virsh restore';
    const offset = dom.consoleSize();
    const t0 = performance.now();
    const r = await runVirsh(['restore', file], { uri: URI, timeoutMs: VIRSH_TIMEOUT_MS });
    if (r.exitCode !== 0) {
      return { save, restore: { memMiB: dom.memMiB, rep, method: rmethod, ok: false, error: r.error } };
    }
    const state = await domainState(dom.name, { uri: URI });
    const seen = await dom.verifyContinues(offset, t0, seqBefore);
    const problems = [
      ...(state === 'running' ? [] : [`domain ${state} when virsh restore returned`]),
      ...(seen.problems ?? []),
    ];
    const cont: CheckpointSample = {
      memMiB: dom.memMiB,
      rep,
      method: 'virsh save, then virsh restore',
      ok: save.ok && problems.length === 0,
      ...(save.downtimeMs !== undefined ? { downtimeMs: save.downtimeMs + r.ms } : {}),
      totalMs: result.ms + r.ms,
    };
    return {
      save,
      cont,
      restore: {
        memMiB: dom.memMiB,
        rep,
        method: rmethod,
        ok: problems.length === 0,
        wallMs: r.ms,
        ...(seqBefore !== undefined ? { seqBefore } : {}),
        ...seen,
        problems,
      },
    };
  } finally {
    fs.rmSync(file, { force: true });
  }
}

async function tlcRestore(dom: Domain, rep: number, live: CheckpointSample): Promise<RestoreSample> {
  const method: RestoreMethod = 'tlc restore (eager, via virsh restore)';
  const id = live.id;
  if (!id) return { memMiB: dom.memMiB, rep, method, ok: false, error: 'no live checkpoint to restore' };
  const show = JSON.parse((await tlc(['show', id, '--json'])).stdout) as { guestHeartbeatSeqBefore?: number };
  await virsh(['destroy', dom.name], { uri: URI });
  const offset = dom.consoleSize();
  const t0 = performance.now();
  const r = await tlc(['restore', id, '--json']);
  if (r.code !== 0) return { memMiB: dom.memMiB, rep, method, ok: false, error: r.stderr.trim() };
  const out = JSON.parse(r.stdout) as { timeToRunningMs: number };
  const state = await domainState(dom.name, { uri: URI });
  const seen = await dom.verifyContinues(offset, t0, show.guestHeartbeatSeqBefore);
  const problems = [
    ...(state === 'running' ? [] : [`domain ${state} when tlc restore returned`]),
    ...(seen.problems ?? []),
  ];
  return {
    memMiB: dom.memMiB,
    rep,
    method,
    ok: problems.length === 0,
    wallMs: r.ms,
    tlcTimeToRunningMs: out.timeToRunningMs,
    ...(show.guestHeartbeatSeqBefore !== undefined ? { seqBefore: show.guestHeartbeatSeqBefore } : {}),
    ...seen,
    problems,
  };
}

/** What libvirt says to a --diskspec on a domain without disks (run once per size; refused, so nothing is created). */
async function diskspecProbe(
  dom: Domain,
): Promise<{ command: string; exitCode: number | null; error: string }> {
  const file = path.join(filesDir, `${dom.name}-probe.mem`);
  const overlay = path.join(filesDir, `${dom.name}-probe.qcow2`);
  const args = [
    'snapshot-create-as',
    dom.name,
    'probe',
    '--live',
    '--memspec',
    `file=${file},snapshot=external`,
    '--diskspec',
    `vda,snapshot=external,file=${overlay}`,
  ];
  const r = await runVirsh(args, { uri: URI, timeoutMs: VIRSH_TIMEOUT_MS });
  if (r.exitCode === 0) await runVirsh(['snapshot-delete', dom.name, 'probe', '--metadata'], { uri: URI });
  fs.rmSync(file, { force: true });
  fs.rmSync(overlay, { force: true });
  return { command: `virsh -c ${URI} ${args.join(' ')}`, exitCode: r.exitCode, error: r.error };
}

interface CheckpointRow {
  memMiB: number;
  method: CheckpointMethod;
  /** Runs that finished / runs. */
  ok: number;
  runs: number;
  downtimeMs?: Summary;
  totalMs?: Summary;
  stopToStreamDoneMs?: Summary;
  bytes?: Summary;
}

interface RestoreRow {
  memMiB: number;
  method: RestoreMethod;
  /** Restores whose guest continued verified / runs. */
  ok: number;
  runs: number;
  toRunningMs?: Summary;
  tlcVirshRestoreMs?: Summary;
  firstHeartbeatMs?: Summary;
}

/** summarize() as an optional property: absent when no run gave a number. */
function opt<K extends string, T>(
  key: K,
  runs: T[],
  pick: (run: T) => number | undefined,
): Partial<Record<K, Summary>> {
  const s = summarize(runs.map((r) => pick(r) ?? NaN));
  return s ? ({ [key]: s } as Record<K, Summary>) : {};
}

function checkpointRows(samples: CheckpointSample[]): CheckpointRow[] {
  return SIZES.flatMap((memMiB) =>
    CHECKPOINT_METHODS.map((method) => {
      const runs = samples.filter((s) => s.memMiB === memMiB && s.method === method);
      const ok = runs.filter((s) => s.ok);
      return {
        memMiB,
        method,
        ok: ok.length,
        runs: runs.length,
        ...opt('downtimeMs', ok, (s) => s.downtimeMs),
        ...opt('totalMs', ok, (s) => s.totalMs),
        ...opt('stopToStreamDoneMs', ok, (s) => s.stopToStreamDoneMs),
        ...opt('bytes', ok, (s) => s.bytes),
      };
    }),
  );
}

function restoreRows(samples: RestoreSample[]): RestoreRow[] {
  return SIZES.flatMap((memMiB) =>
    RESTORE_METHODS.map((method) => {
      const runs = samples.filter((s) => s.memMiB === memMiB && s.method === method);
      const ok = runs.filter((s) => s.ok);
      return {
        memMiB,
        method,
        ok: ok.length,
        runs: runs.length,
        ...opt('toRunningMs', ok, (s) => s.wallMs),
        ...opt('tlcVirshRestoreMs', ok, (s) => s.tlcTimeToRunningMs),
        ...opt('firstHeartbeatMs', ok, (s) => s.firstHeartbeatMs),
      };
    }),
  );
}

function cell(s: Summary | undefined, html = false): string {
  if (!s) return '–';
  const v = (x: number): string => x.toFixed(x < 10 ? 1 : 0);
  const range = `${v(s.min)}–${v(s.max)}`;
  return html ? `${v(s.median)} <small>(${range})</small>` : `${v(s.median)} ms (${range})`;
}

function markdown(cp: CheckpointRow[], rs: RestoreRow[]): string {
  const lines = [
    '| checkpoint (median, min–max) | RAM | finished | downtime | total time |',
    '|---|---|---|---|---|',
    ...cp.map(
      (r) =>
        `| ${r.method} | ${r.memMiB} MiB | ${r.ok}/${r.runs} | ${cell(r.downtimeMs)} | ${cell(r.totalMs)} |`,
    ),
    '',
    '| restore to running (median, min–max) | RAM | continued | command, start to running | tlc: virsh restore part | first heartbeat |',
    '|---|---|---|---|---|---|',
    ...rs.map(
      (r) =>
        `| ${r.method} | ${r.memMiB} MiB | ${r.ok}/${r.runs} | ${cell(r.toRunningMs)} | ${cell(r.tlcVirshRestoreMs)} | ${cell(r.firstHeartbeatMs)} |`,
    ),
  ];
  return lines.join('\n') + '\n';
}

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function renderHtml(result: {
  machine: Record<string, unknown>;
  checkpoints: CheckpointRow[];
  restores: RestoreRow[];
  notes: string[];
}): string {
  const stamp = Object.entries(result.machine)
    .map(([k, v]) => `<span><b>${esc(k)}</b> ${esc(String(v))}</span>`)
    .join(' ');
  const table = (head: string[], rows: string[][]): string =>
    `<table><tr>${head.map((h) => `<th>${esc(h)}</th>`).join('')}</tr>${rows
      .map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join('')}</tr>`)
      .join('')}</table>`;
  const cpTable = table(
    ['checkpoint', 'RAM', 'finished', 'downtime (ms)', 'total time (ms)'],
    result.checkpoints.map((r) => [
      esc(r.method),
      `${r.memMiB} MiB`,
      `${r.ok}/${r.runs}`,
      cell(r.downtimeMs, true),
      cell(r.totalMs, true),
    ]),
  );
  const rsTable = table(
    [
      'restore',
      'RAM',
      'continued',
      'command, start to running (ms)',
      'tlc: virsh restore part (ms)',
      'first heartbeat (ms)',
    ],
    result.restores.map((r) => [
      esc(r.method),
      `${r.memMiB} MiB`,
      `${r.ok}/${r.runs}`,
      cell(r.toRunningMs, true),
      cell(r.tlcVirshRestoreMs, true),
      cell(r.firstHeartbeatMs, true),
    ]),
  );
  const bars = <R extends { memMiB: number; method: string }>(
    rows: R[],
    pick: (r: R) => Summary | undefined,
  ): Parameters<typeof barChart>[2] =>
    rows.map((r) => ({ group: `${r.memMiB} MiB`, series: r.method, value: pick(r)?.median }));
  const commands = Object.entries(COMMANDS)
    .map(([k, v]) => `<li><b>${esc(k)}</b>: <code>${esc(v)}</code></li>`)
    .join('');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tlc libvirt benchmark</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin:0 0 4px}.stamp span{margin-right:14px;color:#555}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}small{color:#777}code{font-size:12px}
figure{display:inline-block;margin:8px 24px 16px 0;vertical-align:top}figcaption{font-weight:600;margin-bottom:4px}
.legend span{margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
</style></head><body>
<h1>tlc against libvirt's save and snapshot</h1><div class="stamp">${stamp}</div>
<p>One libvirt domain per size booting tlc's guest with ${esc(WORKLOAD)} (TCG, 1 vCPU, memfd RAM, no disk);
medians over ${REPS} repetitions, min–max in brackets. Failed runs are counted, not averaged.</p>
${barChart(
  'Checkpoint downtime',
  'ms',
  bars(result.checkpoints, (r) => r.downtimeMs),
)}
${barChart(
  'Checkpoint total time',
  'ms',
  bars(result.checkpoints, (r) => r.totalMs),
)}
${barChart(
  'Restore, command start to running',
  'ms',
  bars(result.restores, (r) => r.toRunningMs),
)}
<h2>Checkpoints</h2>${cpTable}
<h2>Restores</h2>${rsTable}
<h2>Commands measured</h2><ul>${commands}</ul>
<h2>Notes</h2><ul>${result.notes.map((n) => `<li>${esc(n)}</li>`).join('')}</ul>
</body></html>
`;
}

async function main(): Promise<void> {
  const why = libvirtUnavailable();
  if (why) throw new Error(`cannot run libvirt here: ${why}`);
  fs.mkdirSync(filesDir, { recursive: true });
  let daemons: LibvirtDaemons | undefined;
  const checkpoints: CheckpointSample[] = [];
  const restores: RestoreSample[] = [];
  const probes: Record<string, unknown> = {};
  const attach: Record<string, unknown> = {};
  let versions = '';
  const log = (line: string): void => void process.stderr.write(line + '\n');
  try {
    daemons = await startLibvirtDaemons({ uri: URI, logDir: path.join(base, 'daemons'), timeoutMs: 60_000 });
    log(
      daemons.started.length > 0
        ? `libvirt: started ${daemons.started.map((d) => `${d.name} (pid ${d.pid})`).join(', ')}`
        : 'libvirt: already running',
    );
    versions = (await virsh(['version'], { uri: URI })).trim().split('\n').join('; ');
    for (const memMiB of SIZES) {
      const dom = new Domain(memMiB);
      try {
        await dom.define();
        await dom.ensureRunning();
        attach[`${memMiB}`] = dom.attach;
        probes[`${memMiB}`] = await diskspecProbe(dom);
        log(`${memMiB} MiB: --diskspec probe: ${JSON.stringify(probes[`${memMiB}`])}`);
        for (let rep = 1; rep <= REPS; rep++) {
          const report = (s: CheckpointSample | RestoreSample): void => {
            const what = !(RESTORE_METHODS as readonly string[]).includes(s.method)
              ? `downtime ${fmtMs((s as CheckpointSample).downtimeMs)}, total ${fmtMs((s as CheckpointSample).totalMs)}`
              : `to running ${fmtMs((s as RestoreSample).wallMs)}` +
                ((s as RestoreSample).tlcTimeToRunningMs !== undefined
                  ? ` (virsh restore part ${fmtMs((s as RestoreSample).tlcTimeToRunningMs)})`
                  : '') +
                `, first heartbeat ${fmtMs((s as RestoreSample).firstHeartbeatMs)}, ` +
                `seq ${(s as RestoreSample).seqBefore} -> ${(s as RestoreSample).firstSeqAfter}`;
            log(
              `${memMiB} MiB rep ${rep} ${s.method}: ${s.ok ? 'ok' : 'FAILED'}, ${what}${s.error ? ` [${s.error}]` : ''}`,
            );
            if ('problems' in s && s.problems?.length) log(`  problems: ${s.problems.join('; ')}`);
          };
          const step = async <T extends CheckpointSample | RestoreSample>(
            method: T['method'],
            into: T[],
            run: () => Promise<T>,
          ): Promise<T> => {
            let s: T;
            try {
              await dom.ensureRunning();
              await dom.settle();
              s = await run();
            } catch (err) {
              s = { memMiB, rep, method, ok: false, error: errText(err) } as T;
            }
            into.push(s);
            report(s);
            return s;
          };
          const live = await step('tlc live', checkpoints, () => tlcCheckpoint(dom, rep, 'live'));
          await step('tlc stop', checkpoints, () => tlcCheckpoint(dom, rep, 'stop'));
          await step('virsh snapshot-create-as --live', checkpoints, () => virshSnapshot(dom, rep));
          let restored: RestoreSample | undefined;
          let cont: CheckpointSample | undefined;
          await step('virsh save', checkpoints, async () => {
            const r = await virshSaveRestore(dom, rep);
            restored = r.restore;
            cont = r.cont;
            return r.save;
          });
          if (cont) {
            checkpoints.push(cont);
            report(cont);
          }
          if (restored) {
            restores.push(restored);
            report(restored);
          }
          await step('tlc restore (eager, via virsh restore)', restores, () => tlcRestore(dom, rep, live));
        }
      } finally {
        await dom.cleanup();
      }
    }
  } finally {
    await daemons?.stop();
  }

  const cpRows = checkpointRows(checkpoints);
  const rsRows = restoreRows(restores);
  const stamp = machineStamp();
  const notes = [
    `Workload ${WORKLOAD}; TCG, 1 vCPU, memfd RAM (<memoryBacking><source type='memfd'/><access mode='shared'/>), no disk, no network; libvirt ${versions}.`,
    "tlc live/stop downtime: the manifest's metrics.stage3.downtimeMs (QEMU STOP to RESUME event times); total: the tlc CLI process, spawn to exit (Node start, attach lookups, persisting and hashing included).",
    "virsh snapshot-create-as --live downtime: QEMU STOP to RESUME event times, read through libvirt's monitor passthrough; total: virsh, spawn to exit.",
    'virsh save downtime: QEMU STOP event time to virsh save returning (the domain is then shut off: the guest stays stopped until it is restored); total: virsh, spawn to exit. virsh save returns only after QEMU has exited: libvirt writes the file through libvirt_iohelper (fdatasync at the end), then sends QEMU SIGTERM and polls every 200 ms until it is gone. stopToStreamDoneMs in the JSON is QEMU STOP to its MIGRATION completed event.',
    '"virsh save, then virsh restore": virsh save and, right after it returned, virsh restore of its file, as a checkpoint the guest continues after; downtime: QEMU STOP to virsh save returning plus virsh restore\'s wall time (the guest runs again when it returns); total: both virsh wall times.',
    'tlc restore: the CLI process, spawn to exit (it writes a libvirt save image from the checkpoint, then runs virsh restore and waits for running); "virsh restore part" is its own timeToRunningMs.',
    'virsh restore: virsh, spawn to exit, of the file virsh save wrote; the domain is running when it returns.',
    `A restore counts only when the guest printed ${HEARTBEATS_AFTER_RESTORE} new memverify heartbeats within ${HEARTBEAT_TIMEOUT_MS / 1000} s, counting up by one from the checkpoint's, with no corrupt page and no reboot.`,
  ];
  for (const memMiB of SIZES) {
    const live = checkpoints.filter((c) => c.memMiB === memMiB && c.method === 'tlc live' && c.ok);
    const forced = live.filter(
      (c) => (c.metrics as { control?: { forcedSwitchover?: unknown } }).control?.forcedSwitchover,
    );
    if (forced.length > 0) {
      notes.push(
        `${memMiB} MiB: in ${forced.length} of ${live.length} tlc live runs the time-bound controller forced the ` +
          `switchover before pre-copy converged (default deadline from the RAM size; see metrics.control in the JSON), ` +
          `so QEMU sent the remaining set while the guest was stopped.`,
      );
    }
  }
  for (const [size, probe] of Object.entries(probes)) {
    const p = probe as { command: string; exitCode: number | null; error: string };
    notes.push(
      `${size} MiB, --diskspec on a domain without disks: \`${p.command}\` ` +
        (p.exitCode === 0 ? 'was accepted.' : `was refused: "${p.error}". Measured without --diskspec.`),
    );
  }
  const result = {
    benchmark: 'libvirt',
    machine: stamp,
    uri: URI,
    libvirt: versions,
    workload: WORKLOAD,
    sizesMiB: SIZES,
    reps: REPS,
    commands: COMMANDS,
    diskspecProbe: probes,
    attach,
    daemons: daemons
      ? {
          started: daemons.started.map((d) => d.name),
          startMs: daemons.startMs,
          hostChanges: daemons.changes,
        }
      : undefined,
    summary: { checkpoints: cpRows, restores: rsRows },
    notes,
    checkpoints,
    restores,
  };
  const md = markdown(cpRows, rsRows);
  process.stdout.write('\n' + md);
  const json = saveResult(
    'libvirt',
    stamp.date,
    'json',
    JSON.stringify({ ...result, markdown: md }, null, 2) + '\n',
  );
  const html = saveResult(
    'libvirt',
    stamp.date,
    'html',
    renderHtml({ machine: { ...stamp }, checkpoints: cpRows, restores: rsRows, notes }),
  );
  process.stdout.write(`saved ${json} and ${html}\n`);
}

await workspace.run(main);
