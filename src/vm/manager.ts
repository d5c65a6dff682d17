import fs from 'node:fs';
import path from 'node:path';
import { TlcError, VmError } from '../core/errors.js';
import { buildGuest, defaultGuestCacheDir, guestAppendLine, parseWorkloadSpec } from '../guest/build.js';
import { BOOT_OK_PREFIX } from '../guest/heartbeat.js';
import { QmpClient } from '../qmp/client.js';
import type { StatusInfo } from '../qmp/types.js';
import { type AccelChoice, type AccelRequest, chooseAccel } from './accel.js';
import { ConsoleTail } from './console.js';
import { deathCheck, launchQemu } from './launch.js';
import { identify, isAlive, kill, readCmdline, terminate, waitExit } from './process.js';
import { findQemu, resolveMachine } from './qemu.js';
import { type VmRecord, claimVmName, loadVm, runtimePaths, saveVm, vmDir, vmState } from './registry.js';
import { type LaunchArgs, type MemoryBackend, type VmSpec, validateVmName } from './spec.js';

export type Log = (line: string) => void;
export const BUNDLED_GUEST_MIN_MIB = 80;
const quiet: Log = () => undefined;

/** A console line that shows the bundled guest's workload is running. */
export function isHeartbeatLine(line: string): boolean {
  return / heartbeat seq=\d+/.test(line);
}

export interface StartVmOptions {
  name: string;
  memMiB: number;
  cpus?: number;
  workload?: string;
  accel?: AccelRequest;
  machine?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  extraArgs?: string[];
  /** Guest RAM backing; default anonymous RAM. A shared file lets tests inspect guest memory. */
  memory?: MemoryBackend;
  bootTimeoutMs?: number;
  log?: Log;
}

export interface StartedVm {
  record: VmRecord;
  accel: AccelChoice;
  /** ms from QEMU spawn until the first heartbeat on the console. */
  bootMs: number;
}

export function qemuLogFile(name: string): string {
  return path.join(vmDir(name), 'qemu.log');
}

/** Boots a VM and returns once its guest's first heartbeat is on the console. */
export async function startVm(opts: StartVmOptions): Promise<StartedVm> {
  const log = opts.log ?? quiet;
  const name = validateVmName(opts.name);
  if (!Number.isInteger(opts.memMiB) || opts.memMiB < 16)
    throw new TlcError('E_USAGE', '--mem must be at least 16 (MiB)');
  const workload = opts.workload ?? 'idle';
  parseWorkloadSpec(workload);
  const qemu = await findQemu();
  const machine = await resolveMachine(qemu.binary, opts.machine ?? 'pc');
  for (const [flag, file] of [
    ['--kernel', opts.kernel],
    ['--initrd', opts.initrd],
  ] as const) {
    if (file && !fs.existsSync(file)) throw new VmError('E_VM_START', `${flag} ${file}: no such file`);
  }
  let kernel = opts.kernel;
  let initrd = opts.initrd;
  if (!kernel && opts.memMiB < BUNDLED_GUEST_MIN_MIB) {
    // Below this the bundled kernel dies silently while unpacking its initramfs.
    throw new TlcError(
      'E_USAGE',
      `The bundled guest needs --mem ${BUNDLED_GUEST_MIN_MIB} or more (got ${opts.memMiB})`,
    );
  }
  if (!kernel) {
    const guest = await buildGuest({ cacheDir: defaultGuestCacheDir(), log });
    kernel = guest.kernel;
    initrd ??= guest.initrd;
  }
  const append = opts.append ?? guestAppendLine(workload);
  const accel = await chooseAccel(opts.accel ?? 'tcg', {
    qemuBinary: qemu.binary,
    qemuVersion: qemu.version,
    kernel,
    initrd: initrd ?? '',
    append: guestAppendLine('idle'),
    readyMarker: BOOT_OK_PREFIX,
  });
  log(`accelerator: ${accel.accel} (${accel.reason})`);
  claimVmName(name);
  const spec: VmSpec = {
    specVersion: 1,
    name,
    qemu,
    machine,
    accel: accel.accel,
    memMiB: opts.memMiB,
    cpus: opts.cpus ?? 1,
    // memfd: guest RAM that tlc can read through /proc, which live checkpoints under TCG need.
    memory: opts.memory ?? { kind: 'memfd' },
    kernel: path.resolve(kernel),
    ...(initrd ? { initrd: path.resolve(initrd) } : {}),
    append,
    workload,
    extraArgs: opts.extraArgs ?? [],
  };
  const paths = runtimePaths(name);
  const booted = await bootSpec(spec, { ...paths }, { timeoutMs: opts.bootTimeoutMs ?? 120_000, log });
  return { record: booted.record, accel, bootMs: booted.readyMs };
}

/**
 * Launches a spec, records it, and waits until the console shows `ready`. On any failure the
 * QEMU started here is killed: nothing is left running.
 */
export async function bootSpec(
  spec: VmSpec,
  launch: LaunchArgs,
  opts: { timeoutMs: number; log: Log; ready?: (line: string) => boolean; restoredFrom?: string },
): Promise<{ record: VmRecord; readyMs: number; qmpReadyMs: number }> {
  const logFile = qemuLogFile(spec.name);
  const started = await launchQemu(spec, launch, { logFile });
  const record: VmRecord = {
    spec,
    paths: { qmpSocket: launch.qmpSocket, consoleLog: launch.consoleLog, pidFile: launch.pidFile },
    process: started.process,
    startedAt: new Date().toISOString(),
    adopted: false,
    ...(opts.restoredFrom ? { restoredFrom: opts.restoredFrom } : {}),
  };
  saveVm(record);
  started.qmp.close();
  opts.log(`qemu pid ${started.process.pid}, waiting for the guest's first heartbeat`);
  try {
    await new ConsoleTail(launch.consoleLog).waitFor(opts.ready ?? isHeartbeatLine, {
      timeoutMs: opts.timeoutMs,
      check: deathCheck(started.process, logFile, 'during boot'),
      onTimeout: () =>
        new VmError('E_VM_START', `No heartbeat from guest "${spec.name}" within ${opts.timeoutMs} ms`),
    });
  } catch (err) {
    kill(started.process);
    await waitExit(started.process, 3000);
    throw err;
  }
  return { record, readyMs: performance.now() - started.spawnedAt, qmpReadyMs: started.qmpReadyMs };
}

/** Adopts a QEMU that tlc did not start, identified by its QMP socket. */
export async function attachVm(name: string, qmpSocket: string): Promise<VmRecord> {
  validateVmName(name);
  const socketPath = path.resolve(qmpSocket);
  const qmp = await QmpClient.connect(socketPath, { timeoutMs: 5000 });
  try {
    const pid = socketOwnerPid(socketPath);
    const id = pid === undefined ? undefined : identify(pid);
    if (!id) throw new VmError('E_VM_START', `Cannot find the QEMU process listening on ${socketPath}`);
    const argv = readCmdline(id.pid);
    const version = await qmp.execute('query-version');
    const machines = await qmp.execute('query-machines');
    const memdevs = await qmp.execute('query-memdev');
    const kvm = await qmp.execute('query-kvm');
    const machine = machineFromArgv(argv, machines);
    const ram = memdevs.find((m) => m.id === 'ram0') ?? memdevs[0];
    const memMiB = ram ? ram.size / (1024 * 1024) : (argvNumber(argv, '-m') ?? 128);
    claimVmName(name);
    const spec: VmSpec = {
      specVersion: 1,
      name,
      qemu: {
        binary: fs.readlinkSync(`/proc/${id.pid}/exe`),
        version: `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`,
      },
      machine,
      accel: kvm.enabled ? 'kvm' : 'tcg',
      memMiB,
      cpus: argvNumber(argv, '-smp') ?? 1,
      memory: { kind: 'ram' },
      extraArgs: [],
      adoptedArgv: argv,
    };
    const record: VmRecord = {
      spec,
      paths: { ...runtimePaths(name), qmpSocket: socketPath, consoleLog: consoleFromArgv(argv) ?? '' },
      process: id,
      startedAt: new Date().toISOString(),
      adopted: true,
    };
    saveVm(record);
    return record;
  } finally {
    qmp.close();
  }
}

function argvValue(argv: string[], flag: string): string | undefined {
  const i = argv.findIndex((a) => a === flag || a === `-${flag}`);
  return i >= 0 ? argv[i + 1] : undefined;
}

function argvNumber(argv: string[], flag: string): number | undefined {
  const value = argvValue(argv, flag);
  const n = value === undefined ? NaN : parseInt(value.replace(/^(size|cpus)=/, ''), 10);
  return Number.isFinite(n) ? n : undefined;
}

function machineFromArgv(
  argv: string[],
  machines: { name: string; alias?: string; 'is-default'?: boolean }[],
): string {
  const value = argvValue(argv, '-machine') ?? argvValue(argv, '-M');
  const requested = value
    ?.split(',')
    .find((part) => !part.includes('=') || part.startsWith('type='))
    ?.replace(/^type=/, '');
  const byName = machines.find((m) => m.name === requested || m.alias === requested);
  const chosen = byName ?? machines.find((m) => m['is-default']);
  if (!chosen) throw new VmError('E_VM_SPEC', 'Cannot tell which machine type the adopted QEMU runs');
  return chosen.name;
}

function consoleFromArgv(argv: string[]): string | undefined {
  for (const arg of argv) {
    const m = /(?:^|,)path=([^,]+)/.exec(arg);
    if (arg.startsWith('file,') && m?.[1]) return m[1];
    if (arg.startsWith('file:')) return arg.slice(5);
  }
  return undefined;
}

/** The pid of the process holding a listening unix socket, from /proc/net/unix and fd links. */
function socketOwnerPid(socketPath: string): number | undefined {
  const inodes = new Set<string>();
  for (const line of fs.readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols[7] === socketPath && cols[6]) inodes.add(cols[6]);
  }
  if (inodes.size === 0) return undefined;
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${entry}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = fs.readlinkSync(`/proc/${entry}/fd/${fd}`);
      } catch {
        continue;
      }
      const m = /^socket:\[(\d+)\]$/.exec(target);
      if (m?.[1] && inodes.has(m[1])) return Number(entry);
    }
  }
  return undefined;
}

export interface VmStatus {
  name: string;
  state: 'running' | 'stopped';
  pid?: number;
  runState?: StatusInfo['status'];
  accel: string;
  memMiB: number;
  machine: string;
  workload?: string;
  adopted: boolean;
  qmpSocket: string;
  consoleLog: string;
  startedAt: string;
  restoredFrom?: string;
}

export async function vmStatus(record: VmRecord): Promise<VmStatus> {
  const state = vmState(record);
  const status: VmStatus = {
    name: record.spec.name,
    state,
    accel: record.spec.accel,
    memMiB: record.spec.memMiB,
    machine: record.spec.machine,
    adopted: record.adopted,
    qmpSocket: record.paths.qmpSocket,
    consoleLog: record.paths.consoleLog,
    startedAt: record.startedAt,
    ...(record.spec.workload ? { workload: record.spec.workload } : {}),
    ...(record.restoredFrom ? { restoredFrom: record.restoredFrom } : {}),
  };
  if (state === 'running' && record.process) {
    status.pid = record.process.pid;
    try {
      const qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 2000 });
      try {
        status.runState = (await qmp.execute('query-status', undefined, { timeoutMs: 2000 })).status;
      } finally {
        qmp.close();
      }
    } catch {
      // QMP busy or unreachable: report the process state only
    }
  }
  return status;
}

/** Connects to a running VM's QMP socket. */
export async function connectVm(name: string): Promise<{ record: VmRecord; qmp: QmpClient }> {
  const record = loadVm(name);
  if (vmState(record) !== 'running') throw new VmError('E_VM_NOT_FOUND', `VM "${name}" is not running`);
  const qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 5000 });
  return { record, qmp };
}

/**
 * Stops a VM: QMP `quit`, then SIGTERM/SIGKILL by pid for a QEMU tlc started. An adopted QEMU is
 * only asked to quit; tlc never signals a process it did not start.
 */
export async function stopVm(name: string, opts: { force?: boolean } = {}): Promise<{ wasRunning: boolean }> {
  const record = loadVm(name);
  const id = record.process;
  if (!id || !isAlive(id)) return { wasRunning: false };
  if (!opts.force) {
    try {
      const qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 2000 });
      await qmp.execute('quit', undefined, { timeoutMs: 2000 }).catch(() => undefined);
      qmp.close();
    } catch {
      // fall through to signals
    }
    if (await waitExit(id, 5000)) return { wasRunning: true };
  }
  if (record.adopted && !opts.force) {
    throw new VmError(
      'E_VM_DIED',
      `Adopted VM "${name}" (pid ${id.pid}) did not quit; use --force to kill it`,
    );
  }
  if (!(await terminate(id, 3000))) {
    throw new VmError('E_VM_DIED', `QEMU pid ${id.pid} of VM "${name}" did not exit after SIGKILL`);
  }
  return { wasRunning: true };
}

/** Kills a VM tlc started at once, as a host failure would (SIGKILL, no QMP). */
export async function killVm(name: string): Promise<{ wasRunning: boolean }> {
  const record = loadVm(name);
  const id = record.process;
  if (!id || !isAlive(id)) return { wasRunning: false };
  if (record.adopted)
    throw new VmError('E_USAGE', `VM "${name}" was adopted, not started by tlc; use tlc vm stop`);
  kill(id);
  if (!(await waitExit(id, 5000)))
    throw new VmError('E_VM_DIED', `QEMU pid ${id.pid} did not exit after SIGKILL`);
  return { wasRunning: true };
}
