import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { UsageError } from '../core/errors.js';
import { PRIVATE_FILE_MODE, tlcHome } from '../core/paths.js';
import { identify, isAlive, kill, waitExit } from './process.js';
import type { Accel } from './spec.js';

export type AccelRequest = Accel | 'auto';

export function parseAccel(value: string): AccelRequest {
  if (value === 'tcg' || value === 'kvm' || value === 'auto') return value;
  throw new UsageError(`--accel must be tcg, kvm or auto (got "${value}")`);
}

export interface AccelChoice {
  accel: Accel;
  reason: string;
  probeMs?: number;
}

export interface KvmProbeGuest {
  qemuBinary: string;
  qemuVersion: string;
  kernel: string;
  initrd: string;
  append: string;
  /** A console line that proves the guest kernel ran far enough (the init's boot line). */
  readyMarker: string;
}

/** How long a KVM guest gets to reach its init; a healthy KVM boots the bundled guest in ~1 s. */
export const KVM_PROBE_TIMEOUT_MS = 4000;

function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

function kvmUsable(): boolean {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * `auto` picks KVM only when a guest demonstrably runs under it: /dev/kvm can exist where KVM
 * guests hang (nested virtualization), so a bounded boot probe decides, and its verdict is cached
 * until the host reboots.
 */
export async function chooseAccel(request: AccelRequest, guest: KvmProbeGuest): Promise<AccelChoice> {
  if (request !== 'auto') return { accel: request, reason: 'requested' };
  if (!kvmUsable()) return { accel: 'tcg', reason: '/dev/kvm is not available' };
  const cacheFile = path.join(tlcHome(), 'kvm-probe.json');
  const key = `${bootId()} ${guest.qemuVersion}`;
  try {
    const cached = JSON.parse(fs.readFileSync(cacheFile, 'utf8')) as { key: string; works: boolean };
    if (cached.key === key) {
      return cached.works
        ? { accel: 'kvm', reason: 'KVM probe passed (cached)' }
        : { accel: 'tcg', reason: 'KVM guests do not run on this host (cached probe)' };
    }
  } catch {
    // no cache yet
  }
  const started = performance.now();
  const works = await probeKvm(guest, KVM_PROBE_TIMEOUT_MS);
  const probeMs = Math.round(performance.now() - started);
  fs.mkdirSync(tlcHome(), { recursive: true, mode: 0o700 });
  fs.writeFileSync(cacheFile, JSON.stringify({ key, works }), { mode: PRIVATE_FILE_MODE });
  return works
    ? { accel: 'kvm', reason: `KVM probe booted a guest in ${probeMs} ms`, probeMs }
    : {
        accel: 'tcg',
        reason: `KVM guest did not boot within ${KVM_PROBE_TIMEOUT_MS} ms; using TCG`,
        probeMs,
      };
}

export async function probeKvm(guest: KvmProbeGuest, timeoutMs: number): Promise<boolean> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-kvm-probe-'));
  const consoleLog = path.join(dir, 'console.log');
  const child = spawn(
    guest.qemuBinary,
    [
      '-machine',
      'pc,accel=kvm',
      '-m',
      '64M',
      '-smp',
      '1',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-chardev',
      `file,id=ser0,path=${consoleLog}`,
      '-serial',
      'chardev:ser0',
      '-kernel',
      guest.kernel,
      '-initrd',
      guest.initrd,
      '-append',
      guest.append,
    ],
    { stdio: 'ignore' },
  );
  child.on('error', () => undefined);
  const id = child.pid === undefined ? undefined : identify(child.pid);
  try {
    if (!id) return false;
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline && isAlive(id)) {
      const text = fs.existsSync(consoleLog) ? fs.readFileSync(consoleLog, 'latin1') : '';
      if (text.includes(guest.readyMarker)) return true;
      await sleep(50);
    }
    return false;
  } finally {
    // A QEMU stuck inside a broken KVM may take a while to die; never wait on it for long.
    if (id) {
      kill(id);
      await waitExit(id, 1000);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
