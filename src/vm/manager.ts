import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { TlcError, VmError, errorText } from '../core/errors.js';
import {
  buildGuest,
  defaultGuestCacheDir,
  formatWorkloadSpec,
  guestAppendLine,
  parseWorkloadSpec,
  workloadUsesDisk,
} from '../guest/build.js';
import { BOOT_OK_PREFIX, WORKLOAD_EXIT_PREFIX, parseDiskVerdict } from '../guest/heartbeat.js';
import { QmpClient } from '../qmp/client.js';
import type { StatusInfo } from '../qmp/types.js';
import { type AccelChoice, type AccelRequest, chooseAccel } from './accel.js';
import { ConsoleTail } from './console.js';
import { deathCheck, launchQemu } from './launch.js';
import {
  type ProcessIdentity,
  identify,
  isAlive,
  kill,
  readCmdline,
  terminate,
  waitExit,
} from './process.js';
import { memoryLayout } from './memory-layout.js';
import { type MonitorAddress, openMonitor } from './monitor-connect.js';
import { LibvirtMonitor } from '../libvirt/monitor.js';
import { consoleFromDomainXml, domainPidFile } from '../libvirt/domain-xml.js';
import { virsh } from '../libvirt/virsh.js';
import type { Monitor } from '../qmp/monitor.js';
import { findQemu, resolveMachine } from './qemu.js';
import { qemuImgBinary } from './qemu-img.js';
import { type VmRecord, claimVmName, loadVm, runtimePaths, saveVm, vmDir, vmState } from './registry.js';
import {
  DISK_FORMATS,
  RAM_BACKEND_ID,
  type DiskFormat,
  type DiskRequest,
  type LaunchArgs,
  type MemoryBackend,
  type VmDisk,
  type VmSpec,
  diskNames,
  qemuOptionValue,
  validateVmName,
} from './spec.js';

export type Log = (line: string) => void;
export const BUNDLED_GUEST_MIN_MIB = 80;
const quiet: Log = () => undefined;

const run = promisify(execFile);

/**
 * A console line that shows the bundled guest's workload is running: a memverify/dirty/idle
 * heartbeat or a diskverify `synced` line (see src/guest/heartbeat.ts).
 */
export function isHeartbeatLine(line: string): boolean {
  return / heartbeat seq=\d+|(?:^|\s)diskverify: synced seq=\d+/.test(line);
}

/** What `startVm` waits for before it returns. */
export type ReadyCondition =
  /** The bundled guest's first heartbeat (after a passed disk verification, for diskverify). */
  | { kind: 'heartbeat' }
  /** A console line matching `pattern` (`--ready REGEX`). */
  | { kind: 'line'; pattern: RegExp }
  /** Only that QEMU runs (`--no-wait`). */
  | { kind: 'qemu' };

export interface StartVmOptions {
  name: string;
  memMiB: number;
  cpus?: number;
  /**
   * Workload of the bundled guest. Without it, a VM given `kernel` or `ready` runs a custom guest
   * (the user's kernel, or a firmware boot from its disks); otherwise the bundled guest runs `idle`.
   */
  workload?: string;
  accel?: AccelRequest;
  machine?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  extraArgs?: string[];
  /** virtio-blk disks, in order: the first is /dev/vda in a Linux guest. */
  disks?: DiskRequest[];
  /** Default: the first heartbeat for the bundled guest, QEMU running for a custom guest. */
  ready?: ReadyCondition;
  /** Guest RAM backing; default anonymous RAM. A shared file lets tests inspect guest memory. */
  memory?: MemoryBackend;
  bootTimeoutMs?: number;
  log?: Log;
}

export interface StartedVm {
  record: VmRecord;
  accel: AccelChoice;
  /** ms from QEMU spawn until the VM was ready (first heartbeat, the `ready` line, or QMP up). */
  bootMs: number;
}

/**
 * Checks the disks a VM is to start with and names their nodes: each must be an existing image
 * file that no other process has open for writing (qemu-img takes the same locks QEMU does), of
 * a format tlc handles (probed with `qemu-img info` when not given).
 */
export async function resolveDisks(requests: DiskRequest[], qemuBinary: string, log: Log): Promise<VmDisk[]> {
  const disks: VmDisk[] = [];
  const seen = new Set<string>();
  for (const [index, request] of requests.entries()) {
    const file = path.resolve(request.path);
    const flag = `--disk ${request.path}`;
    qemuOptionValue(file, 'disk image');
    if (!fs.existsSync(file)) throw new VmError('E_VM_START', `${flag}: no such file`);
    const real = fs.realpathSync(file);
    if (!fs.statSync(real).isFile()) throw new VmError('E_VM_START', `${flag}: not a regular file`);
    if (seen.has(real)) throw new VmError('E_VM_START', `${flag}: the same image is given twice`);
    seen.add(real);
    const probed = await probeImageFormat(qemuImgBinary(qemuBinary), file, flag);
    let format: DiskFormat;
    if (!request.format) {
      if (!DISK_FORMATS.includes(probed as DiskFormat)) {
        throw new VmError('E_VM_START', `${flag}: format ${probed} is not supported (use qcow2 or raw)`);
      }
      format = probed as DiskFormat;
    } else {
      format = request.format;
      if (format === 'qcow2' && probed !== 'qcow2') {
        throw new VmError('E_VM_START', `${flag}: format=qcow2 given, but the file is ${probed}`);
      }
      if (format === 'raw' && probed !== 'raw') log(`${flag}: a ${probed} image used as raw, as asked`);
    }
    disks.push({ path: file, format, ...diskNames(index), ...(request.readOnly ? { readOnly: true } : {}) });
  }
  return disks;
}

/** The image's format as `qemu-img info` probes it (it takes the locks QEMU would take to read). */
async function probeImageFormat(qemuImg: string, file: string, flag: string): Promise<string> {
  let stdout: string;
  try {
    ({ stdout } = await run(qemuImg, ['info', '--output=json', file], {
      timeout: 30_000,
      env: { ...process.env, LC_ALL: 'C' },
    }));
  } catch (err) {
    const e = err as { stderr?: string; code?: unknown };
    if (e.code === 'ENOENT') {
      throw new VmError(
        'E_VM_START',
        `${flag}: cannot run ${qemuImg} (install it with: apt-get install qemu-utils)`,
      );
    }
    const why = (e.stderr ?? '').trim().replace(/\s*\n\s*/g, ' ') || errorText(err);
    if (/lock|another process/i.test(why)) {
      throw new VmError('E_VM_START', `${flag}: the image is in use by another process (${why})`);
    }
    throw new VmError('E_VM_START', `${flag}: ${qemuImg} cannot read it: ${why}`, { cause: err });
  }
  const info = JSON.parse(stdout) as { format?: unknown };
  return typeof info.format === 'string' ? info.format : 'unknown';
}

/**
 * Readiness of the bundled guest: its first heartbeat. It fails at once, instead of at the
 * timeout, when the workload exits or diskverify rejects the disk (the VM is then stopped and the
 * console log kept). With diskverify, the verdict must come first: a memverify heartbeat beside
 * it does not count until the disk was found good.
 */
function bundledGuestReady(name: string, workload: string): (line: string) => boolean {
  let diskVerified = !workloadUsesDisk(parseWorkloadSpec(workload));
  return (line) => {
    const verdict = parseDiskVerdict(line);
    if (verdict && !verdict.ok) {
      throw new VmError(
        'E_VM_START',
        `Guest "${name}" found its disk damaged: record ${verdict.record} is bad (${verdict.reason}) ` +
          `after ${verdict.valid} good records of ${verdict.records}`,
      );
    }
    if (verdict) diskVerified = true;
    if (line.includes(WORKLOAD_EXIT_PREFIX)) {
      throw new VmError('E_VM_START', `Guest "${name}": ${line.slice(line.indexOf(WORKLOAD_EXIT_PREFIX))}`);
    }
    return diskVerified && isHeartbeatLine(line);
  };
}

export function qemuLogFile(name: string): string {
  return path.join(vmDir(name), 'qemu.log');
}

/**
 * Boots a VM and returns once it is ready: the bundled guest's first heartbeat, a console line
 * the caller names, or (custom guests, by default) QEMU running.
 */
export async function startVm(opts: StartVmOptions): Promise<StartedVm> {
  const log = opts.log ?? quiet;
  const name = validateVmName(opts.name);
  if (!Number.isInteger(opts.memMiB) || opts.memMiB < 16)
    throw new TlcError('E_USAGE', '--mem must be at least 16 (MiB)');
  const bundled = opts.workload !== undefined || (opts.kernel === undefined && opts.ready === undefined);
  const workload = bundled ? formatWorkloadSpec(parseWorkloadSpec(opts.workload ?? 'idle')) : undefined;
  if (workload && workloadUsesDisk(parseWorkloadSpec(workload)) && !opts.disks?.length) {
    throw new TlcError('E_USAGE', `Workload ${workload} needs a disk with an ext4 filesystem (--disk)`);
  }
  const qemu = await findQemu();
  const machine = await resolveMachine(qemu.binary, opts.machine ?? 'pc');
  for (const [flag, file] of [
    ['--kernel', opts.kernel],
    ['--initrd', opts.initrd],
  ] as const) {
    if (file && !fs.existsSync(file)) throw new VmError('E_VM_START', `${flag} ${file}: no such file`);
  }
  const disks = await resolveDisks(opts.disks ?? [], qemu.binary, log);
  let kernel = opts.kernel;
  let initrd = opts.initrd;
  if (bundled && !kernel && opts.memMiB < BUNDLED_GUEST_MIN_MIB) {
    // Below this the bundled kernel dies silently while unpacking its initramfs.
    throw new TlcError(
      'E_USAGE',
      `The bundled guest needs --mem ${BUNDLED_GUEST_MIN_MIB} or more (got ${opts.memMiB})`,
    );
  }
  // The bundled guest is built when it runs, and for the KVM probe of `--accel auto`.
  const needBundled = (bundled && !kernel) || opts.accel === 'auto';
  const guest = needBundled ? await buildGuest({ cacheDir: defaultGuestCacheDir(), log }) : undefined;
  if (bundled && !kernel && guest) {
    kernel = guest.kernel;
    initrd ??= guest.initrd;
  }
  const append = opts.append ?? (workload ? guestAppendLine(workload) : kernel ? 'console=ttyS0' : undefined);
  const accel = await chooseAccel(opts.accel ?? 'tcg', {
    qemuBinary: qemu.binary,
    qemuVersion: qemu.version,
    kernel: guest?.kernel ?? kernel ?? '',
    initrd: guest?.initrd ?? initrd ?? '',
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
    ...(kernel ? { kernel: path.resolve(kernel) } : {}),
    ...(initrd ? { initrd: path.resolve(initrd) } : {}),
    ...(append !== undefined ? { append } : {}),
    ...(workload ? { workload } : {}),
    disks,
    extraArgs: opts.extraArgs ?? [],
  };
  const ready = opts.ready ?? (workload ? { kind: 'heartbeat' } : { kind: 'qemu' });
  if (!workload && ready.kind === 'heartbeat') {
    throw new TlcError(
      'E_USAGE',
      'A custom guest has no tlc heartbeat: wait for --ready REGEX or use --no-wait',
    );
  }
  if (!workload && !opts.ready)
    log('custom guest: returning once QEMU runs (name a console line with --ready)');
  const paths = runtimePaths(name);
  const booted = await bootSpec(
    spec,
    { ...paths },
    {
      timeoutMs: opts.bootTimeoutMs ?? 120_000,
      log,
      ready:
        ready.kind === 'qemu'
          ? 'qemu'
          : ready.kind === 'line'
            ? (line: string) => ready.pattern.test(line)
            : bundledGuestReady(name, workload ?? 'idle'),
      ...(ready.kind === 'line' ? { readyWhat: `a console line matching ${String(ready.pattern)}` } : {}),
    },
  );
  return { record: booted.record, accel, bootMs: booted.readyMs };
}

/**
 * Launches a spec, records it, and waits until the console shows `ready`. On any failure the
 * QEMU started here is killed: nothing is left running.
 */
export async function bootSpec(
  spec: VmSpec,
  launch: LaunchArgs,
  opts: {
    timeoutMs: number;
    log: Log;
    /** A console line that shows the guest is ready (default: a heartbeat), or 'qemu': QMP up. */
    ready?: ((line: string) => boolean) | 'qemu';
    /** What `ready` waits for, for the timeout message (default: a heartbeat). */
    readyWhat?: string;
    restoredFrom?: string;
  },
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
  const ready = opts.ready ?? isHeartbeatLine;
  if (ready === 'qemu') {
    try {
      const status = await started.qmp.execute('query-status');
      opts.log(`qemu pid ${started.process.pid}, ${status.status}`);
    } catch (err) {
      kill(started.process);
      await waitExit(started.process, 3000);
      throw new VmError('E_VM_START', `QEMU of "${spec.name}" stopped answering QMP: ${errorText(err)}`, {
        cause: err,
      });
    } finally {
      started.qmp.close();
    }
    return { record, readyMs: started.qmpReadyMs, qmpReadyMs: started.qmpReadyMs };
  }
  started.qmp.close();
  const what = opts.readyWhat ?? "the guest's first heartbeat";
  opts.log(`qemu pid ${started.process.pid}, waiting for ${what}`);
  try {
    await new ConsoleTail(launch.consoleLog).waitFor(ready, {
      timeoutMs: opts.timeoutMs,
      check: deathCheck(started.process, logFile, 'during boot'),
      onTimeout: () =>
        new VmError(
          'E_VM_START',
          `Guest "${spec.name}" printed no ${what.replace(/^the /, '')} within ${opts.timeoutMs} ms`,
        ),
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
    const probed = await probeRunningQemu(qmp, id, argv);
    claimVmName(name);
    const spec: VmSpec = { ...probed, name, cpus: argvNumber(argv, '-smp') ?? 1, adoptedArgv: argv };
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

/**
 * What a running QEMU tells about itself over QMP, as the spec of a VM tlc adopts: version,
 * machine type, accelerator, and where main RAM lives. Its binary from /proc.
 */
async function probeRunningQemu(
  qmp: Monitor,
  id: ProcessIdentity,
  argv: string[],
): Promise<Omit<VmSpec, 'name' | 'cpus'>> {
  const version = await qmp.execute('query-version');
  const machines = await qmp.execute('query-machines');
  const kvm = await qmp.execute('query-kvm');
  const layout = await memoryLayout(qmp);
  return {
    specVersion: 1,
    qemu: {
      binary: fs.readlinkSync(`/proc/${id.pid}/exe`),
      version: `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`,
    },
    machine: machineFromArgv(argv, machines),
    accel: kvm.enabled ? 'kvm' : 'tcg',
    memMiB: layout.memMiB,
    memory: layout.memory,
    ...(layout.ramBlock !== RAM_BACKEND_ID ? { ramBlock: layout.ramBlock } : {}),
    extraArgs: [],
  };
}

/** How to reach a VM's monitor. */
export function monitorAddress(record: VmRecord): MonitorAddress {
  return { qmpSocket: record.paths.qmpSocket, ...(record.libvirt ? { libvirt: record.libvirt } : {}) };
}

/**
 * Adopts a libvirt domain by name. libvirt owns its QMP monitor, so tlc goes through libvirt's
 * monitor passthrough (libvirt then marks the domain tainted, "custom monitor"), and records the
 * domain's migratable XML so a restore can bring it back under libvirt.
 */
export async function attachLibvirt(name: string, domain: string, uri: string): Promise<VmRecord> {
  validateVmName(name);
  const qmp = await LibvirtMonitor.connect(domain, { uri, timeoutMs: 10_000 });
  try {
    const pidText = fs.readFileSync(domainPidFile(domain, uri), 'utf8').trim();
    const id = identify(Number(pidText));
    if (!id) throw new VmError('E_VM_START', `Cannot find the QEMU process of libvirt domain ${domain}`);
    const probed = await probeRunningQemu(qmp, id, readCmdline(id.pid));
    const xml = await virsh(['dumpxml', '--migratable', domain], { uri });
    claimVmName(name);
    const spec: VmSpec = {
      ...probed,
      name,
      cpus: Number(/<vcpu[^>]*>(\d+)</.exec(xml)?.[1] ?? 1),
      libvirt: { domain, uri, xml },
    };
    const consoleLog = consoleFromDomainXml(xml) ?? '';
    const record: VmRecord = {
      spec,
      paths: { ...runtimePaths(name), qmpSocket: '', consoleLog },
      process: id,
      startedAt: new Date().toISOString(),
      adopted: true,
      libvirt: { domain, uri },
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
  /** `bundled`: tlc's test guest running `workload`; `custom`: the user's; `adopted`: tlc vm attach. */
  guest: 'bundled' | 'custom' | 'adopted';
  workload?: string;
  disks?: { device: string; path: string; format: DiskFormat; readOnly?: boolean }[];
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
    guest: record.adopted ? 'adopted' : record.spec.workload ? 'bundled' : 'custom',
    adopted: record.adopted,
    qmpSocket: record.paths.qmpSocket,
    consoleLog: record.paths.consoleLog,
    startedAt: record.startedAt,
    ...(record.spec.workload ? { workload: record.spec.workload } : {}),
    ...(record.spec.disks?.length
      ? {
          disks: record.spec.disks.map((d) => ({
            device: d.device,
            path: d.path,
            format: d.format,
            ...(d.readOnly ? { readOnly: true } : {}),
          })),
        }
      : {}),
    ...(record.restoredFrom ? { restoredFrom: record.restoredFrom } : {}),
  };
  if (state === 'running' && record.process) {
    status.pid = record.process.pid;
    try {
      const qmp = await openMonitor(monitorAddress(record), 2000);
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
export async function connectVm(name: string): Promise<{ record: VmRecord; qmp: Monitor }> {
  const record = loadVm(name);
  if (vmState(record) !== 'running') throw new VmError('E_VM_NOT_FOUND', `VM "${name}" is not running`);
  const qmp = await openMonitor({
    qmpSocket: record.paths.qmpSocket,
    ...(record.libvirt ? { libvirt: record.libvirt } : {}),
  });
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
      const qmp = await openMonitor(monitorAddress(record), 2000);
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
