/** Measurements shared by the benchmarks: the guest's own view of a window, a child's peak memory. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseHeartbeat } from '../guest/heartbeat.js';

export interface GuestWindow {
  /** Longest gap between two loop iterations the guest reported during the window. */
  maxStallMs: number;
  /** Mean page-write rate the guest reported during the window / before it (null if unknown). */
  rateRatio: number | null;
}

function consoleSize(file: string): number {
  return fs.statSync(file).size;
}

/** Heartbeats between two console offsets: longest stall and the guest's own write rates. */
function heartbeatsBetween(file: string, from: number, to: number): { stallUs: number; rates: number[] } {
  const text = fs.readFileSync(file, 'latin1').slice(from, to);
  let stallUs = 0;
  const rates: number[] = [];
  for (const line of text.split('\n')) {
    const hb = parseHeartbeat(line);
    if (!hb || hb.kind === 'idle') continue;
    stallUs = Math.max(stallUs, hb.maxStallUs);
    if (hb.kind === 'dirty') rates.push(hb.rate);
  }
  return { stallUs, rates };
}

function mean(values: number[]): number | null {
  return values.length === 0 ? null : values.reduce((a, b) => a + b, 0) / values.length;
}

/**
 * Runs `run` and reports what the guest saw meanwhile, against the second before it. The console
 * is read after a short pause so the heartbeat covering the end of the window is included.
 */
export async function measureGuestWindow<T>(
  consoleLog: string,
  run: () => Promise<T>,
): Promise<{ result: T; guest: GuestWindow; ms: number }> {
  const before0 = consoleSize(consoleLog);
  await sleep(1000);
  const before1 = consoleSize(consoleLog);
  const t0 = performance.now();
  const result = await run();
  const ms = performance.now() - t0;
  await sleep(300);
  const pre = heartbeatsBetween(consoleLog, before0, before1);
  const during = heartbeatsBetween(consoleLog, before1, consoleSize(consoleLog));
  const preRate = mean(pre.rates);
  const duringRate = mean(during.rates);
  return {
    result,
    ms,
    guest: {
      maxStallMs: during.stallUs / 1000,
      rateRatio: preRate && duringRate !== null ? duringRate / preRate : null,
    },
  };
}

/** Runs a command, returning its stdout and its peak resident memory (VmHWM) in bytes. */
export async function runMeasured(
  cmd: string,
  args: string[],
): Promise<{ code: number | null; stdout: string; peakRss: number }> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'ignore'], env: process.env });
  let stdout = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  let peakRss = 0;
  const sampler = setInterval(() => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${child.pid}/status`, 'utf8'));
      if (m?.[1]) peakRss = Math.max(peakRss, Number(m[1]) * 1024);
    } catch {
      // exited
    }
  }, 10);
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  clearInterval(sampler);
  return { code, stdout, peakRss };
}
