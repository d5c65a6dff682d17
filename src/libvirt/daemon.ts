/**
 * Starting libvirt by hand where nothing else does (no systemd as PID 1: containers, CI), for
 * tests and benchmarks: `virtlogd`, then the monolithic `libvirtd` (Debian 12 ships no modular
 * daemons), both in the foreground as children of this process, with Debian's stock configuration
 * (qemu.conf: QEMU runs as `libvirt-qemu`). `stop()` ends exactly the daemons started here, by pid.
 *
 * When libvirt already answers at the URI (systemd socket activation, or an administrator's
 * daemons), nothing is started and nothing is stopped.
 *
 * Configuration files are not touched. Two runtime things are set beforehand:
 * - `/run/libvirt/network/autostarted`, libvirt's own marker that autostart already ran since boot
 *   (virDriverShouldAutostart). Without it the first libvirtd start would bring up Debian's
 *   `default` NAT network (a virbr0 bridge and firewall rules) on the host; these domains need none.
 * - `/dev/kvm` gets the group `kvm` and mode 0660, as Debian's udev rule gives it, when there is no
 *   udev to do so (containers: root:root 0600); the original owner and mode are put back by
 *   `stop()`. Otherwise libvirt 9.0 finds KVM usable when it probes QEMU's capabilities but not
 *   usable for `libvirt-qemu` when it checks its cache, so it throws the cache away and probes QEMU
 *   again on every lookup: 4-30 s added to each `virsh version`, `define`, `start` and `restore`.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { DEFAULT_URI, LibvirtError, runVirsh } from './virsh.js';

const RUN_DIR = '/run/libvirt';
const VIRTLOGD_SOCKET = join(RUN_DIR, 'virtlogd-sock');
const NETWORK_AUTOSTARTED = join(RUN_DIR, 'network', 'autostarted');
const DAEMON_DIRS = ['/usr/sbin', '/usr/local/sbin', '/sbin'];
const STOP_GRACE_MS = 10_000;
const KVM_DEVICE = '/dev/kvm';

export interface StartedDaemon {
  name: 'virtlogd' | 'libvirtd';
  pid: number;
  log: string;
}

export interface LibvirtDaemons {
  uri: string;
  /** Daemons started here (empty when libvirt was already running). */
  started: readonly StartedDaemon[];
  /** From spawning the first daemon to libvirt answering `virsh version`. */
  startMs: number;
  /** What was changed on the host for the daemons (put back by stop()), for reports. */
  changes: readonly string[];
  /** Ends the daemons started here (SIGTERM, then SIGKILL after 10 s), libvirtd first. */
  stop(): Promise<void>;
}

export interface StartOptions {
  uri?: string;
  /** Where the daemons' stdout/stderr go (virtlogd.log, libvirtd.log). */
  logDir: string;
  /** Bound for each daemon to answer; default 30 s. */
  timeoutMs?: number;
}

function findDaemon(name: string): string | undefined {
  for (const dir of DAEMON_DIRS) {
    const path = join(dir, name);
    if (existsSync(path)) return path;
  }
  return undefined;
}

function inPath(name: string): boolean {
  return (process.env.PATH ?? '').split(':').some((dir) => dir && existsSync(join(dir, name)));
}

/**
 * Why libvirt's system daemons cannot be run here, or undefined when they can: Linux, root, the
 * Debian packages installed (`libvirt-daemon-system`: the daemons, virsh and the `libvirt-qemu`
 * user), and QEMU.
 */
export function libvirtUnavailable(): string | undefined {
  if (process.platform !== 'linux')
    return `libvirt's system daemons need Linux (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return 'starting libvirt (qemu:///system) needs root';
  const missing = [
    inPath('virsh') ? undefined : 'virsh',
    findDaemon('libvirtd') ? undefined : 'libvirtd',
    findDaemon('virtlogd') ? undefined : 'virtlogd',
    inPath('qemu-system-x86_64') ? undefined : 'qemu-system-x86_64',
  ].filter((m) => m !== undefined);
  if (missing.length > 0) {
    return `libvirt is not installed (missing ${missing.join(', ')}; scripts/setup.sh --test installs Debian's libvirt-daemon-system)`;
  }
  let passwd = '';
  try {
    passwd = readFileSync('/etc/passwd', 'utf8');
  } catch {
    // checked below
  }
  if (!/^libvirt-qemu:/m.test(passwd))
    return 'the libvirt-qemu user does not exist (install libvirt-daemon-system)';
  return undefined;
}

/** The gid of `group` from /etc/group. */
function groupId(group: string): number | undefined {
  try {
    const line = readFileSync('/etc/group', 'utf8')
      .split('\n')
      .find((l) => l.startsWith(`${group}:`));
    const gid = Number(line?.split(':')[2]);
    return Number.isInteger(gid) ? gid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Gives /dev/kvm Debian's udev permissions (group kvm, 0660) when nothing did; returns how to put
 * back what it found, or undefined when it changed nothing.
 */
function kvmDeviceAsUdev(): { what: string; undo: () => void } | undefined {
  if (!existsSync(KVM_DEVICE)) return undefined;
  const kvmGid = groupId('kvm');
  if (kvmGid === undefined) return undefined;
  const st = statSync(KVM_DEVICE);
  const mode = st.mode & 0o7777;
  if ((mode & 0o006) === 0o006 || (st.gid === kvmGid && (mode & 0o060) === 0o060)) return undefined;
  chownSync(KVM_DEVICE, st.uid, kvmGid);
  chmodSync(KVM_DEVICE, 0o660);
  return {
    what: `${KVM_DEVICE} set to group kvm, mode 0660 (was gid ${st.gid}, mode ${mode.toString(8).padStart(4, '0')})`,
    undo: () => {
      chownSync(KVM_DEVICE, st.uid, st.gid);
      chmodSync(KVM_DEVICE, mode);
    },
  };
}

/** Does `virsh -c URI version` answer? */
export async function libvirtAnswers(uri: string, timeoutMs = 5000): Promise<boolean> {
  try {
    const r = await runVirsh(['version'], { uri, timeoutMs });
    return r.exitCode === 0;
  } catch {
    return false;
  }
}

function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function tail(file: string, bytes = 600): string {
  try {
    const text = readFileSync(file, 'utf8');
    return text.slice(-bytes).trim().split('\n').join(' | ');
  } catch {
    return '';
  }
}

function spawnDaemon(
  name: StartedDaemon['name'],
  logDir: string,
): { child: ChildProcess; info: StartedDaemon } {
  const binary = findDaemon(name);
  if (!binary) throw new LibvirtError(`${name} is not installed`, 'no-daemon');
  const log = join(logDir, `${name}.log`);
  const fd = openSync(log, 'a', 0o600);
  try {
    const child = spawn(binary, [], { stdio: ['ignore', fd, fd], env: { ...process.env, LC_ALL: 'C' } });
    if (child.pid === undefined) throw new LibvirtError(`Cannot start ${binary}`, 'no-daemon');
    return { child, info: { name, pid: child.pid, log } };
  } finally {
    closeSync(fd);
  }
}

async function waitUntil(
  what: string,
  child: ChildProcess,
  log: string,
  timeoutMs: number,
  ready: () => Promise<boolean>,
): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      const how = child.signalCode ?? `exit status ${child.exitCode}`;
      throw new LibvirtError(`${what} exited (${how}) while starting: ${tail(log)}`, 'no-daemon');
    }
    if (await ready()) return;
    if (performance.now() > deadline) {
      throw new LibvirtError(`${what} did not answer within ${timeoutMs} ms: ${tail(log)}`, 'no-daemon');
    }
    await sleep(100);
  }
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const signal = (sig: NodeJS.Signals): void => {
    try {
      if (child.pid !== undefined) process.kill(child.pid, sig);
    } catch {
      // already gone
    }
  };
  signal('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([
    exited.then(() => false),
    new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(true), STOP_GRACE_MS);
    }),
  ]);
  clearTimeout(timer);
  if (timedOut) {
    signal('SIGKILL');
    await exited;
  }
}

/**
 * Makes libvirt answer at `uri` (default qemu:///system): uses running daemons, or starts
 * virtlogd and libvirtd. Throws a LibvirtError (fault `no-daemon`) with the daemon's log tail when
 * one exits or does not answer in time; daemons started before the failure are stopped.
 */
export async function startLibvirtDaemons(opts: StartOptions): Promise<LibvirtDaemons> {
  const uri = opts.uri ?? DEFAULT_URI;
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const t0 = performance.now();
  if (await libvirtAnswers(uri)) {
    return { uri, started: [], startMs: performance.now() - t0, changes: [], stop: async () => undefined };
  }
  const reason = libvirtUnavailable();
  if (reason) throw new LibvirtError(reason, 'no-daemon');
  mkdirSync(opts.logDir, { recursive: true });
  const children: { child: ChildProcess; info: StartedDaemon }[] = [];
  const changes: string[] = [];
  let kvm: ReturnType<typeof kvmDeviceAsUdev>;
  const stop = async (): Promise<void> => {
    for (const { child } of [...children].reverse()) await stopChild(child);
    children.length = 0;
    kvm?.undo();
    kvm = undefined;
  };
  try {
    kvm = kvmDeviceAsUdev();
    if (kvm) changes.push(kvm.what);
    if (!(await socketAnswers(VIRTLOGD_SOCKET))) {
      const d = spawnDaemon('virtlogd', opts.logDir);
      children.push(d);
      await waitUntil('virtlogd', d.child, d.info.log, timeoutMs, () => socketAnswers(VIRTLOGD_SOCKET));
    }
    if (!existsSync(NETWORK_AUTOSTARTED)) {
      mkdirSync(join(RUN_DIR, 'network'), { recursive: true, mode: 0o755 });
      writeFileSync(NETWORK_AUTOSTARTED, '', { mode: 0o600 });
      changes.push(`${NETWORK_AUTOSTARTED} created (no autostart of the default network)`);
    }
    const d = spawnDaemon('libvirtd', opts.logDir);
    children.push(d);
    // `version` answers once the QEMU driver is up and has QEMU's capabilities (probed on the
    // first start, ~10-30 s under load, then cached): each try may take that long.
    const deadline = performance.now() + timeoutMs;
    await waitUntil('libvirtd', d.child, d.info.log, timeoutMs, () =>
      libvirtAnswers(uri, Math.max(1000, deadline - performance.now())),
    );
  } catch (err) {
    await stop();
    throw err;
  }
  return { uri, started: children.map((c) => c.info), startMs: performance.now() - t0, changes, stop };
}
