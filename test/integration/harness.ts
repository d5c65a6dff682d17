import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { after } from 'node:test';
import { promisify } from 'node:util';
import { scanConsole, type ConsoleScan } from '../../src/guest/heartbeat.js';
import { isAlive, kill, waitExit } from '../../src/vm/process.js';
import { listVms } from '../../src/vm/registry.js';

const run = promisify(execFile);

/** Repository root (tests run from dist/test/integration). */
export const ROOT = path.resolve(import.meta.dirname, '..', '..', '..');
export const TLC_BIN = path.join(ROOT, 'bin', 'tlc.js');

/**
 * Gives this test file its own private tlc state and checkpoint store, and on exit kills (by pid)
 * every QEMU started under it: tests leave no process behind.
 */
export function isolatedTlc(): { home: string; store: string } {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-test-'));
  const home = path.join(base, 'home');
  const store = path.join(base, 'store');
  process.env.TLC_HOME = home;
  process.env.TLC_STORE = store;
  after(async () => {
    await killAllVms();
    fs.rmSync(base, { recursive: true, force: true });
  });
  return { home, store };
}

export async function killAllVms(): Promise<void> {
  for (const record of listVms()) {
    if (record.adopted || !record.process || !isAlive(record.process)) continue;
    kill(record.process);
    await waitExit(record.process, 5000);
  }
}

export function readConsole(file: string): ConsoleScan {
  return scanConsole(fs.readFileSync(file, 'latin1'));
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the real CLI as a user would, with this file's TLC_HOME/TLC_STORE. */
export async function tlc(args: string[], timeoutMs = 120_000): Promise<CliResult> {
  try {
    const { stdout, stderr } = await run(process.execPath, [TLC_BIN, ...args], {
      timeout: timeoutMs,
      env: process.env,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** pids of live qemu-system processes whose command line mentions `marker` (a path of ours). */
export function qemuPidsMentioning(marker: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${entry}/cmdline`, 'latin1');
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'latin1');
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      if (state !== 'Z' && cmd.includes('qemu-system') && cmd.includes(marker)) pids.push(Number(entry));
    } catch {
      // raced with exit
    }
  }
  return pids;
}
