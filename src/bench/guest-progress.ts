/**
 * Guest work lost to a checkpoint, measured from the host: the workload's own progress counter
 * (memverify's rewrites, dirty's updates), read from its console against host time. The guest's
 * clock stops while the VM is stopped, so its own rates cannot see a freeze; a counter that does
 * not move while host time passes does.
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseHeartbeat } from '../guest/heartbeat.js';

const POLL_MS = 50;
/** Progress rate before the window is measured over this much host time. */
const BEFORE_MS = 2000;

/** The newest progress counter in the console, or undefined before the first heartbeat. */
function newestCounter(consoleLog: string): { counter: number } | undefined {
  const fd = fs.openSync(consoleLog, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const start = Math.max(0, size - 64 * 1024);
    const buf = Buffer.alloc(size - start);
    fs.readSync(fd, buf, 0, buf.length, start);
    const lines = buf.toString('latin1').split('\n');
    for (let i = lines.length - 1; i >= 0; i--) {
      const hb = parseHeartbeat(lines[i] ?? '');
      if (hb?.kind === 'memverify') return { counter: hb.pages };
      if (hb?.kind === 'dirty') return { counter: hb.updates };
    }
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

export interface WorkLost {
  /** Host time the window lasted, ms. */
  windowMs: number;
  /**
   * The workload changed phase inside the window or the rate measurement before it (memverify
   * grow finished its fill, after which it rewrites several times faster): no fair rate to compare.
   */
  phaseChange: boolean;
  /** Guest progress during the window ÷ what the rate before would have made. */
  progressRatio: number | null;
  /** Host ms of guest work lost: window − progress ÷ rate before. */
  lostMs: number | null;
}

/**
 * Runs `run` and measures the guest's progress over it against the two seconds before. The
 * window ends when `run` returns plus one heartbeat period, so the last heartbeat is in.
 */
export async function measureWorkLost<T>(
  consoleLog: string,
  run: () => Promise<T>,
): Promise<{ result: T; work: WorkLost }> {
  const sizeBefore = fs.statSync(consoleLog).size;
  const first = newestCounter(consoleLog);
  const tBefore = performance.now();
  await sleep(BEFORE_MS);
  const atStart = newestCounter(consoleLog);
  const t0 = performance.now();
  const result = await run();
  await sleep(150);
  const t1 = performance.now();
  const atEnd = newestCounter(consoleLog);
  const windowMs = t1 - t0;
  const phaseChange = consoleSince(consoleLog, sizeBefore).includes('memverify: filled');
  if (phaseChange || !first || !atStart || !atEnd || atStart.counter <= first.counter)
    return { result, work: { windowMs, phaseChange, progressRatio: null, lostMs: null } };
  const ratePerMs = (atStart.counter - first.counter) / (t0 - tBefore);
  const progress = atEnd.counter - atStart.counter;
  return {
    result,
    work: {
      windowMs,
      phaseChange,
      progressRatio: progress / (ratePerMs * windowMs),
      lostMs: windowMs - progress / ratePerMs,
    },
  };
}

function consoleSince(consoleLog: string, offset: number): string {
  return fs.readFileSync(consoleLog, 'latin1').slice(offset);
}

/** Polls until the guest prints a heartbeat with a progress counter (after boot or a restore). */
export async function waitProgress(consoleLog: string, timeoutMs: number): Promise<void> {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    if (newestCounter(consoleLog)) return;
    await sleep(POLL_MS);
  }
  throw new Error(`no progress heartbeat in ${consoleLog} after ${timeoutMs} ms`);
}
