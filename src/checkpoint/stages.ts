import type { CheckpointMode, StageMetrics } from '../store/manifest.js';

/**
 * Turns the moments a checkpoint passes through (QMP events, stream milestones) into the three
 * stages of the kvm-tlc report. Pure bookkeeping: times in ms since the checkpoint started,
 * bytes as received by tlc at that moment.
 */
export interface StageMarks {
  mode: CheckpointMode;
  /** Migration became `active` (setup done). */
  active?: { t: number; bytes: number };
  /** Second dirty-bitmap sync: the first full pass over memory is done. */
  firstPassDone?: { t: number; bytes: number };
  /** Highest MIGRATION_PASS seen. */
  passes: number;
  /** VM stopped (STOP event). */
  stopped?: { t: number; bytes: number };
  /** Whole stream received. */
  streamDone?: { t: number; bytes: number };
  /** VM running again (RESUME event or `cont` reply). */
  resumed?: { t: number };
  /** QEMU's own timestamps (ms since the epoch) of the STOP and RESUME events: the downtime. */
  stopTs?: number;
  resumeTs?: number;
}

/**
 * `qemu`: what query-migrate reported at completion (downtime; bytes sent while stopped).
 * `durableMs` is the caller's: it is known only once the files are on disk.
 */
export function stageMetrics(
  m: StageMarks,
  bytesStored: number,
  qemu: { downtimeMs?: number; downtimeBytes?: number; setupMs?: number } = {},
): Omit<StageMetrics, 'durableMs'> {
  const qemuDowntimeMs = qemu.downtimeMs;
  const end = m.streamDone ?? { t: 0, bytes: 0 };
  const active = m.active ?? { t: 0, bytes: 0 };
  const downtimeMs =
    m.stopTs !== undefined && m.resumeTs !== undefined && m.resumeTs >= m.stopTs
      ? m.resumeTs - m.stopTs
      : m.stopped && m.resumed
        ? Math.max(0, m.resumed.t - m.stopped.t)
        : 0;
  let stage1: StageMetrics['stage1'];
  let stage2: StageMetrics['stage2'];
  let stage3: StageMetrics['stage3'];
  if (m.mode === 'live') {
    const pass1 = m.firstPassDone ?? m.stopped ?? end;
    const stop = m.stopped ?? end;
    stage1 = { ms: pass1.t - active.t, bytes: pass1.bytes - active.bytes };
    stage2 = {
      iterations: Math.max(0, m.passes - 2),
      ms: Math.max(0, stop.t - pass1.t),
      bytes: Math.max(0, stop.bytes - pass1.bytes),
    };
    stage3 = { ms: end.t - stop.t, bytes: qemu.downtimeBytes ?? end.bytes - stop.bytes, downtimeMs };
  } else {
    // cow: the VM pauses only at the start; stop: it is paused throughout. One pass either way.
    stage1 = { ms: end.t - active.t, bytes: end.bytes - active.bytes };
    stage2 = { iterations: 0, ms: 0, bytes: 0 };
    stage3 = { ms: downtimeMs, bytes: 0, downtimeMs };
  }
  return {
    setupMs: active.t,
    stage1,
    stage2,
    stage3,
    totalMs: Math.max(end.t, m.resumed?.t ?? 0),
    ...(qemuDowntimeMs !== undefined ? { qemuDowntimeMs } : {}),
    ...(qemu.setupMs !== undefined ? { qemuSetupMs: qemu.setupMs } : {}),
    bytesReceived: end.bytes,
    bytesStored,
  };
}
