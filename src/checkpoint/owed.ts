import fs from 'node:fs';
import path from 'node:path';
import { errorText, isErrnoCode } from '../core/errors.js';
import { writeFileAtomic } from '../core/fsutil.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';
import type { Monitor } from '../qmp/monitor.js';
import { openMonitor } from '../vm/monitor-connect.js';
import { type DiskLeftovers, removeLeftovers } from '../disk/capture.js';
import type { CheckpointMode } from '../store/manifest.js';
import { type ProcessIdentity, identify, isAlive } from '../vm/process.js';
import { type VmRecord, listVms, vmDir } from '../vm/registry.js';
import {
  type MigrationSettings,
  cancelMigration,
  restoreMigrationSettings,
  waitMigrationEnd,
} from './migration-settings.js';

/**
 * What a running checkpoint owes its VM, written before tlc pauses it or starts a migration.
 * Signal handlers cannot run on SIGKILL or an OOM kill; this record lets the next tlc command
 * that touches the VM finish the job: cancel the migration, resume the guest, put back QEMU's
 * migration settings.
 */
export interface OwedRecord {
  /** The tlc process that owes it; while it lives, nobody else acts. */
  owner: ProcessIdentity;
  qemu: ProcessIdentity;
  qmpSocket: string;
  libvirt?: { domain: string; uri: string };
  /** Resume the guest: it was running when the checkpoint began. */
  resume: boolean;
  /** A background snapshot (`cow`) is waited for, never cancelled: that freezes the guest on 7.2. */
  mode: CheckpointMode;
  /** Disk copies it may have started: jobs, target nodes, bitmaps (removed if present). */
  disk?: DiskLeftovers;
  settings: MigrationSettings;
  checkpointId: string;
  since: string;
}

const OWED_FILE = 'checkpoint-owed.json';

function owedFile(vm: string): string {
  return path.join(vmDir(vm), OWED_FILE);
}

export function recordOwed(vm: string, owed: Omit<OwedRecord, 'owner' | 'since'>): void {
  const owner = identify(process.pid);
  if (!owner) throw new Error('cannot identify this process in /proc');
  const record: OwedRecord = { owner, since: new Date().toISOString(), ...owed };
  writeFileAtomic(owedFile(vm), JSON.stringify(record, null, 2) + '\n', PRIVATE_FILE_MODE);
}

export function clearOwed(vm: string): void {
  fs.rmSync(owedFile(vm), { force: true });
}

function readOwed(vm: string): OwedRecord | undefined {
  try {
    return JSON.parse(fs.readFileSync(owedFile(vm), 'utf8')) as OwedRecord;
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) return undefined;
    // A half-written record cannot exist (atomic write); an unreadable one is useless: drop it.
    clearOwed(vm);
    return undefined;
  }
}

/**
 * Pays what a dead tlc owed VM `vm`: cancels its migration, resumes a guest it paused, restores
 * the settings it changed. Returns a one-line account, or undefined when nothing was owed (or its
 * owner still runs).
 */
export async function settleOwed(vm: string): Promise<string | undefined> {
  const owed = readOwed(vm);
  if (!owed || isAlive(owed.owner)) return undefined;
  if (!isAlive(owed.qemu)) {
    clearOwed(vm);
    return undefined;
  }
  let qmp: Monitor;
  try {
    qmp = await openMonitor(owed);
  } catch (err) {
    return `VM ${vm} may be paused by an interrupted checkpoint, but its QMP socket does not answer (${errorText(err)}); run any tlc command again to retry`;
  }
  const done: string[] = [];
  try {
    if (owed.mode === 'cow') {
      if (!(await waitMigrationEnd(qmp, 60_000)))
        return `VM ${vm}: the background snapshot of an interrupted checkpoint is still running; try again later`;
    } else if (await cancelMigration(qmp)) done.push('cancelled its migration');
    if (owed.disk) {
      const removed = await removeLeftovers(qmp, owed.disk);
      if (removed.length > 0) done.push('removed its unfinished disk copies');
    }
    if (owed.libvirt) {
      // Descriptors it handed QEMU (disk copy targets) would keep deleted files open.
      for (const set of await qmp.execute('query-fdsets')) {
        if (set.fds.some((f) => f.opaque === fdsetTag(owed.checkpointId)))
          await qmp.execute('remove-fd', { 'fdset-id': set['fdset-id'] }).catch(() => undefined);
      }
    }
    const status = await qmp.execute('query-status');
    await restoreMigrationSettings(qmp, owed.settings, owed.qemu.pid);
    done.push('put back its migration settings');
    if (
      owed.resume &&
      !status.running &&
      ['paused', 'postmigrate', 'finish-migrate'].includes(status.status)
    ) {
      await qmp.execute('cont');
      done.unshift(`resumed it (it was ${status.status})`);
    }
    clearOwed(vm);
  } catch (err) {
    return `VM ${vm} was left by an interrupted checkpoint and could not be settled: ${errorText(err)}`;
  } finally {
    qmp.close();
  }
  return `VM ${vm} was left by an interrupted checkpoint (${owed.checkpointId}, tlc pid ${owed.owner.pid} is gone): ${done.join(', ')}`;
}

/** Settles every VM that a dead tlc left owed; returns one line per VM it acted on. */
export async function settleAllOwed(records: VmRecord[] = listVms()): Promise<string[]> {
  const lines: string[] = [];
  for (const r of records) {
    if (!fs.existsSync(owedFile(r.spec.name))) continue;
    const line = await settleOwed(r.spec.name);
    if (line) lines.push(line);
  }
  return lines;
}

/** The `opaque` tag of descriptor sets a checkpoint hands to QEMU (libvirt domains). */
export function fdsetTag(checkpointId: string): string {
  return `tlc:${checkpointId}`;
}
