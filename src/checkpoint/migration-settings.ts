import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Monitor } from '../qmp/monitor.js';
import type { MigrationCapabilityName, MigrationParameters, MigrationStatus } from '../qmp/types.js';

/** Capabilities a checkpoint sets; each is put back to what it was before. */
export const TOUCHED_CAPABILITIES: readonly MigrationCapabilityName[] = [
  'events',
  'background-snapshot',
  'xbzrle',
  'auto-converge',
  'postcopy-ram',
  'multifd',
  'return-path',
  'pause-before-switchover',
];

/** Parameters a checkpoint (and its controller) may change. */
export const TOUCHED_PARAMETERS = [
  'max-bandwidth',
  'downtime-limit',
  'throttle-trigger-threshold',
  'cpu-throttle-initial',
  'cpu-throttle-increment',
  'max-cpu-throttle',
] as const satisfies readonly (keyof MigrationParameters)[];

/**
 * A VM's migration settings as found, so a checkpoint leaves QEMU as it was: a VM that libvirt or
 * an operator migrates later must not inherit 1 TiB/s, a huge downtime limit or a capability
 * (background-snapshot makes libvirt's own `virsh save` fail).
 */
export interface MigrationSettings {
  capabilities: Partial<Record<MigrationCapabilityName, boolean>>;
  parameters: MigrationParameters;
}

/** Statuses in which QEMU refuses capability changes (a migration is still running). */
const BUSY: ReadonlySet<MigrationStatus> = new Set([
  'setup',
  'active',
  'cancelling',
  'pre-switchover',
  'device',
  'wait-unplug',
  'postcopy-active',
]);

export async function readMigrationSettings(qmp: Monitor): Promise<MigrationSettings> {
  const caps = await qmp.execute('query-migrate-capabilities');
  const params = await qmp.execute('query-migrate-parameters');
  const capabilities: MigrationSettings['capabilities'] = {};
  for (const c of caps) if (TOUCHED_CAPABILITIES.includes(c.capability)) capabilities[c.capability] = c.state;
  const parameters: Record<string, number> = {};
  for (const key of TOUCHED_PARAMETERS) {
    const value = params[key];
    if (typeof value === 'number') parameters[key] = value;
  }
  return { capabilities, parameters };
}

/** Waits (without cancelling) until a migration ends; false if it still runs after `timeoutMs`. */
export async function waitMigrationEnd(qmp: Monitor, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (!info.status || !BUSY.has(info.status)) return true;
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
}

/** Cancels a migration still running and waits until QEMU has let go of it. */
export async function cancelMigration(qmp: Monitor, timeoutMs = 10_000): Promise<boolean> {
  let info = await qmp.execute('query-migrate');
  if (!info.status || !BUSY.has(info.status)) return false;
  await qmp.execute('migrate_cancel');
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    info = await qmp.execute('query-migrate');
    if (!info.status || !BUSY.has(info.status)) return true;
    if (Date.now() > deadline) return true;
    await sleep(10);
  }
}

/**
 * Puts back saved settings once the migration has ended (completed, failed or cancelled) and QEMU
 * has cleaned up after it (`qemuPid`, see waitMigrationCleanup).
 */
export async function restoreMigrationSettings(
  qmp: Monitor,
  saved: MigrationSettings,
  qemuPid: number,
): Promise<void> {
  await waitMigrationCleanup(qemuPid);
  const capabilities = Object.entries(saved.capabilities).map(([capability, state]) => ({
    capability: capability as MigrationCapabilityName,
    state,
  }));
  if (capabilities.length > 0) await qmp.execute('migrate-set-capabilities', { capabilities });
  if (Object.keys(saved.parameters).length > 0) await qmp.execute('migrate-set-parameters', saved.parameters);
}

/**
 * Waits until QEMU has finished cleaning up after a migration ended. The status says `failed` or
 * `completed` before QEMU's cleanup runs, and a background snapshot's cleanup lifts its write
 * protection (closes its userfaultfd): tlc changes no capability under a cleanup still running.
 * The descriptor closing is the sign that cleanup ran. (A background snapshot cut off mid-stream
 * never closes it and freezes the guest whatever tlc does, seen on 7.2.22: tlc never cuts one.)
 */
export async function waitMigrationCleanup(qemuPid: number, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const open = userfaultfdOpen(qemuPid);
    if (open === false) return;
    if (open === undefined) {
      // Cannot look (another user's QEMU): give the cleanup bottom half time to run.
      await sleep(250);
      return;
    }
    await sleep(10);
  }
}

function userfaultfdOpen(pid: number): boolean | undefined {
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const fd of fds) {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[userfaultfd]') return true;
    } catch {
      // closed meanwhile
    }
  }
  return false;
}
