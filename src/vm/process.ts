import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * A process identity that survives pid reuse: the pid plus its start time in clock ticks since
 * boot (field 22 of /proc/<pid>/stat). tlc only ever signals a process whose identity matches.
 */
export interface ProcessIdentity {
  pid: number;
  startTicks: number;
}

export function readStartTicks(pid: number): number | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // comm (field 2) may contain spaces and parentheses: fields after it start past the last ')'.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const state = rest[0];
  if (state === 'Z' || state === 'X') return undefined;
  const ticks = Number(rest[19]);
  return Number.isFinite(ticks) ? ticks : undefined;
}

export function identify(pid: number): ProcessIdentity | undefined {
  const startTicks = readStartTicks(pid);
  return startTicks === undefined ? undefined : { pid, startTicks };
}

export function isAlive(id: ProcessIdentity): boolean {
  return readStartTicks(id.pid) === id.startTicks;
}

export function readCmdline(pid: number): string[] {
  const raw = fs.readFileSync(`/proc/${pid}/cmdline`);
  const parts = raw.toString('utf8').split('\0');
  if (parts.at(-1) === '') parts.pop();
  return parts;
}

export async function waitExit(id: ProcessIdentity, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isAlive(id)) {
    if (Date.now() >= deadline) return false;
    await sleep(20);
  }
  return true;
}

function signal(id: ProcessIdentity, sig: NodeJS.Signals): void {
  if (!isAlive(id)) return;
  try {
    process.kill(id.pid, sig);
  } catch {
    // already gone
  }
}

/** SIGTERM, then SIGKILL after `graceMs`. Resolves once the process is gone (or `graceMs`×2 passed). */
export async function terminate(id: ProcessIdentity, graceMs = 3000): Promise<boolean> {
  signal(id, 'SIGTERM');
  if (await waitExit(id, graceMs)) return true;
  signal(id, 'SIGKILL');
  return waitExit(id, graceMs);
}

export function kill(id: ProcessIdentity): void {
  signal(id, 'SIGKILL');
}
