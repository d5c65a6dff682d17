import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { after } from 'node:test';
import { promisify } from 'node:util';
import { scanConsole, type ConsoleScan } from '../../src/guest/heartbeat.js';
import { QmpClient } from '../../src/qmp/client.js';
import { lastHeartbeatSeq } from '../../src/vm/console.js';
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
  // The per-user signing key goes here too, never into the real home.
  process.env.XDG_CONFIG_HOME = path.join(base, 'config');
  after(async () => {
    await stopMemoryServers();
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
export async function tlc(
  args: string[],
  timeoutMs = 120_000,
  env: NodeJS.ProcessEnv = process.env,
): Promise<CliResult> {
  try {
    const { stdout, stderr } = await run(process.execPath, [TLC_BIN, ...args], { timeout: timeoutMs, env });
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

/** The VM's whole migration configuration as QEMU reports it (tlc must leave it as found). */
export async function migrationConfig(qmpSocket: string): Promise<unknown> {
  const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 5000 });
  try {
    return {
      capabilities: await qmp.execute('query-migrate-capabilities'),
      parameters: await qmp.execute('query-migrate-parameters'),
    };
  } finally {
    qmp.close();
  }
}

/** QEMU's run state (running, paused, postmigrate, ...). */
export async function runState(qmpSocket: string): Promise<string> {
  const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 5000 });
  try {
    return (await qmp.execute('query-status')).status;
  } finally {
    qmp.close();
  }
}

/** Resolves once the guest's heartbeat seq passes the one it shows now; false after `timeoutMs`. */
export async function heartbeatsAdvance(consoleLog: string, timeoutMs = 3000): Promise<boolean> {
  const start = lastHeartbeatSeq(consoleLog) ?? -1;
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if ((lastHeartbeatSeq(consoleLog) ?? -1) > start) return true;
    await sleep(50);
  }
  return false;
}

export interface RunningCli {
  child: ChildProcess;
  stderr: () => string;
  /** Resolves with the exit code (or the signal's 128+n). */
  exited: Promise<number>;
  /** Resolves once stderr has a line matching `re`; rejects if the process exits first. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<void>;
}

/** Starts the real CLI in the background, for tests that interrupt it at a chosen moment. */
export function spawnTlc(args: string[], env: NodeJS.ProcessEnv = {}): RunningCli {
  const child = spawn(process.execPath, [TLC_BIN, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ...env },
  });
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => (err += chunk));
  const exited = new Promise<number>((resolve) =>
    child.once('exit', (code, signal) =>
      resolve(code ?? 128 + (signal ? (os.constants.signals[signal] ?? 0) : 0)),
    ),
  );
  let done = false;
  void exited.then(() => (done = true));
  return {
    child,
    stderr: () => err,
    exited,
    async waitFor(re: RegExp, timeoutMs = 60_000): Promise<void> {
      const deadline = Date.now() + timeoutMs;
      while (!re.test(err)) {
        if (done) throw new Error(`tlc exited before printing ${re}: ${err}`);
        if (Date.now() > deadline) throw new Error(`tlc did not print ${re} within ${timeoutMs} ms: ${err}`);
        await sleep(10);
      }
    },
  };
}

export interface MemoryServerProcess {
  proc: RunningCli;
  /** tcp://127.0.0.1:<port the kernel picked> */
  url: string;
  data: string;
}

const memoryServers: MemoryServerProcess[] = [];

/** Stops the memory servers this test file started, by pid (SIGTERM, SIGKILL after 5 s). */
async function stopMemoryServers(): Promise<void> {
  for (const s of memoryServers.splice(0)) {
    if (s.proc.child.exitCode !== null || s.proc.child.signalCode !== null) continue;
    s.proc.child.kill('SIGTERM');
    const timer = setTimeout(() => s.proc.child.kill('SIGKILL'), 5000);
    await s.proc.exited;
    clearTimeout(timer);
  }
}

/**
 * Starts a real `tlc serve` on a loopback port the kernel picks and waits for its ready line.
 * isolatedTlc's cleanup stops it when the test file ends.
 */
export async function startMemoryServer(
  data: string,
  secretFile: string,
  extra: string[] = [],
): Promise<MemoryServerProcess> {
  const proc = spawnTlc([
    'serve',
    '--listen',
    'tcp://127.0.0.1:0',
    '--data',
    data,
    '--secret-file',
    secretFile,
    ...extra,
  ]);
  const served: MemoryServerProcess = { proc, url: '', data };
  memoryServers.push(served);
  await proc.waitFor(/listening on tcp:\/\/127\.0\.0\.1:\d+/, 10_000);
  const port = /listening on tcp:\/\/127\.0\.0\.1:(\d+)/.exec(proc.stderr())?.[1];
  served.url = `tcp://127.0.0.1:${port}`;
  return served;
}

/** An ext4 filesystem of `mib` MiB in a raw file, made on the host, holding the files in `content`. */
export async function ext4Image(file: string, mib: number, content?: string): Promise<void> {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, mib * 1024 * 1024);
  const env = { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` };
  await run('mkfs.ext4', ['-q', '-F', ...(content ? ['-d', content] : []), file], { env });
}

/** The same as a qcow2 image (the raw file is removed). */
export async function ext4Qcow2(file: string, mib: number, content?: string): Promise<void> {
  const raw = `${file}.raw`;
  await ext4Image(raw, mib, content);
  await run('qemu-img', ['convert', '-O', 'qcow2', raw, file]);
  fs.rmSync(raw);
}

/** Polls a console until `done` holds for what it shows; fails with the console's text. */
export async function waitConsole(
  file: string,
  done: (scan: ConsoleScan) => boolean,
  what: string,
  timeoutMs = 10_000,
): Promise<ConsoleScan> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const scan = readConsole(file);
    if (done(scan)) return scan;
    if (Date.now() > deadline)
      throw new Error(`timed out waiting for ${what}; console:\n${fs.readFileSync(file, 'latin1')}`);
    await sleep(50);
  }
}
