import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { CheckpointError, InterruptedError, QmpError, errorText } from '../core/errors.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import type { Monitor } from '../qmp/monitor.js';
import type { StatusInfo } from '../qmp/types.js';
import type { DiskCapture, DiskLeftovers } from '../disk/capture.js';
import type { CheckpointMode } from '../store/manifest.js';
import type { CheckpointStore } from '../store/store.js';
import type { GuestRam } from '../vm/guest-ram.js';
import { connectVm } from '../vm/manager.js';
import type { VmRecord } from '../vm/registry.js';
import {
  type MigrationSettings,
  cancelMigration,
  readMigrationSettings,
  waitMigrationEnd,
  restoreMigrationSettings,
} from './migration-settings.js';
import { clearOwed, fdsetTag, recordOwed, settleOwed } from './owed.js';
import type { CheckpointReceiver } from './receiver.js';
import type { LibvirtMonitor } from '../libvirt/monitor.js';
import { type MigrationChannel, openMigrationChannel } from '../libvirt/stream-fd.js';

/**
 * Everything one checkpoint holds: the QMP connection, the staging directory, the socket
 * directory, the guest-RAM handle, the receiver, and the undo of every QEMU setting it changed.
 * `unwind` undoes a failed checkpoint and says what it did; `dispose` releases the resources
 * exactly once, on every path.
 */
export class CheckpointSession {
  readonly id: string;
  private stagingDir: string | undefined;
  private socketDir: string | undefined;
  private saved: MigrationSettings | undefined;
  private owes = false;
  private disposed = false;
  guestRam: GuestRam | undefined;
  disks: DiskCapture | undefined;
  receiver: CheckpointReceiver | undefined;
  /** A migration was started and may still run. */
  migrating = false;
  /** Set once chosen: a background snapshot (`cow`) must never be cut off mid-stream. */
  mode: CheckpointMode | undefined;
  private guard_: ChildProcess | undefined;
  private channel: MigrationChannel | undefined;
  /** Descriptor sets handed to QEMU; removed when the checkpoint ends. */
  private readonly fdsets: number[] = [];
  private readonly aborted: Promise<never>;

  private constructor(
    readonly record: VmRecord,
    readonly qmp: Monitor,
    readonly status: StatusInfo,
    readonly store: CheckpointStore,
    readonly signal: AbortSignal | undefined,
  ) {
    this.id = store.newId(record.spec.name);
    this.aborted = new Promise<never>((_resolve, reject) => {
      const fire = (): void => reject(interruption(signal));
      if (signal?.aborted) fire();
      else signal?.addEventListener('abort', fire, { once: true });
    });
    this.aborted.catch(() => undefined);
  }

  /**
   * Connects to the VM. A checkpoint interrupted earlier by a kill that ran no handler is
   * settled first (its guest resumed, its settings put back) and reported through `log`.
   */
  static async open(
    vm: string,
    store: CheckpointStore,
    signal: AbortSignal | undefined,
    log: (line: string) => void,
  ): Promise<CheckpointSession> {
    const settled = await settleOwed(vm);
    if (settled) log(settled);
    const { record, qmp } = await connectVm(vm);
    try {
      const status = await qmp.execute('query-status');
      return new CheckpointSession(record, qmp, status, store, signal);
    } catch (err) {
      qmp.close();
      throw err;
    }
  }

  get vmName(): string {
    return this.record.spec.name;
  }

  private get qemuPid(): number {
    return this.record.process?.pid ?? 0;
  }

  get wasRunning(): boolean {
    return this.status.running;
  }

  /** Races `work` against an interruption: a signal ends the wait at once. */
  guard<T>(work: Promise<T>): Promise<T> {
    work.catch(() => undefined);
    return Promise.race([work, this.aborted]);
  }

  throwIfInterrupted(): void {
    if (this.signal?.aborted) throw interruption(this.signal);
  }

  staging(): string {
    this.stagingDir ??= this.store.stage(this.id);
    return this.stagingDir;
  }

  /**
   * Where QEMU sends the stream. tlc's own QEMUs connect to a private unix socket; a libvirt
   * domain's QEMU runs as another user and cannot, so it gets a connected descriptor instead
   * (`getfd` through libvirt, then `fd:NAME`), as libvirt itself does for `virsh save`.
   */
  async migrationTarget(receiver: CheckpointReceiver): Promise<string> {
    if (this.record.libvirt) {
      this.channel = await openMigrationChannel(this.qmp as LibvirtMonitor);
      receiver.consume(this.channel.readable);
      return this.channel.uri;
    }
    const socketPath = this.socketPath();
    await receiver.listen(socketPath);
    return `unix:${socketPath}`;
  }

  /**
   * Hands QEMU an open descriptor of one of tlc's private files (`add-fd` through libvirt) and
   * returns the name QEMU opens it by: a libvirt domain's QEMU runs as another user.
   */
  async passFile(file: string): Promise<string> {
    const fd = fs.openSync(file, 'r+');
    try {
      // Tagged with the checkpoint, so a tlc killed later can have its descriptors removed.
      const reply = (await (this.qmp as LibvirtMonitor).executeRaw(
        'add-fd',
        { opaque: fdsetTag(this.id) },
        { fds: [fd] },
      )) as {
        'fdset-id': number;
      };
      this.fdsets.push(reply['fdset-id']);
      return `/dev/fdset/${reply['fdset-id']}`;
    } finally {
      fs.closeSync(fd);
    }
  }

  /** A private directory for the migration socket (QEMU runs as us: no world access needed). */
  socketPath(): string {
    if (!this.socketDir) {
      this.socketDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-ckpt-'));
      fs.chmodSync(this.socketDir, PRIVATE_DIR_MODE);
    }
    return path.join(this.socketDir, 'migrate.sock');
  }

  /**
   * Reads the migration settings to put back later and records on disk, before anything is
   * changed, what this checkpoint owes the VM: a kill that runs no handler is settled by the
   * next tlc command.
   */
  async owe(disk?: DiskLeftovers): Promise<void> {
    const running = (await this.qmp.execute('query-migrate')).status;
    if (running && !['none', 'completed', 'failed', 'cancelled'].includes(running))
      throw new CheckpointError(
        `VM "${this.vmName}" is already migrating (status ${running}); try again when it ends`,
      );
    this.saved = await readMigrationSettings(this.qmp);
    const { process: qemu } = this.record;
    if (!qemu) throw new CheckpointError(`VM "${this.vmName}" has no known QEMU process`);
    recordOwed(this.vmName, {
      qemu,
      qmpSocket: this.record.paths.qmpSocket,
      ...(this.record.libvirt ? { libvirt: this.record.libvirt } : {}),
      resume: this.wasRunning,
      mode: this.mode ?? 'live',
      ...(disk ? { disk } : {}),
      settings: this.saved,
      checkpointId: this.id,
    });
    this.owes = true;
  }

  /** After success: settings back, nothing owed any more. The guest already runs. */
  async settle(): Promise<void> {
    if (this.saved) await restoreMigrationSettings(this.qmp, this.saved, this.qemuPid);
    if (this.owes) clearOwed(this.vmName);
    this.owes = false;
  }

  /**
   * Undoes a failed or interrupted checkpoint: cancels the migration, resumes the guest if it
   * ran before, puts back the migration settings, removes the staging directory. Never throws;
   * returns what it did, one phrase each, for the one-line report.
   */
  async unwind(reason: Error): Promise<string[]> {
    const done: string[] = [];
    const qmpAlive = !this.qmp.closed;
    if (this.mode === 'cow' && this.migrating && this.receiver && qmpAlive) {
      // Cancelling a background snapshot freezes the guest on QEMU 7.2: let it finish unread.
      const ended = await this.receiver.drain(BACKGROUND_SNAPSHOT_DRAIN_MS);
      done.push(
        ended ? 'let the background snapshot finish unsaved' : 'gave up waiting for the background snapshot',
      );
      await waitMigrationEnd(this.qmp, BACKGROUND_SNAPSHOT_DRAIN_MS).catch(() => undefined);
    }
    this.receiver?.abort(reason);
    if (qmpAlive) {
      try {
        if (await cancelMigration(this.qmp)) done.push('cancelled the migration');
      } catch (err) {
        done.push(`could not cancel the migration (${errorText(err)})`);
      }
      if (this.disks) {
        try {
          const removed = await this.disks.abort();
          if (removed.length > 0) done.push(`removed the disk copies it had started in QEMU`);
        } catch (err) {
          done.push(`could not remove its disk copies from QEMU (${errorText(err)})`);
        }
      }
      if (!this.wasRunning) {
        // Leave it as found: a background snapshot may have started a guest its user had paused.
        try {
          if ((await this.qmp.execute('query-status')).running) {
            await this.qmp.execute('stop');
            done.push(`paused VM ${this.vmName} again, as it was`);
          }
        } catch (err) {
          done.push(`could not pause VM ${this.vmName} again (${errorText(err)})`);
        }
      }
      if (this.wasRunning) {
        try {
          if (await resumeIfPaused(this.qmp)) done.push(`resumed VM ${this.vmName}`);
        } catch (err) {
          done.push(`could not resume VM ${this.vmName} (${errorText(err)})`);
        }
      }
      if (this.saved) {
        try {
          await restoreMigrationSettings(this.qmp, this.saved, this.qemuPid);
          done.push('put back its migration settings');
        } catch (err) {
          done.push(`could not put back its migration settings (${errorText(err)})`);
        }
      }
    }
    // With QMP gone (QEMU died) there is nothing left to owe; with it alive, everything was paid.
    const paid = !qmpAlive || !done.some((d) => d.startsWith('could not'));
    if (this.owes && paid) {
      clearOwed(this.vmName);
      this.owes = false;
    }
    if (this.stagingDir) {
      this.store.discard(this.stagingDir);
      done.push('removed the partial checkpoint');
    }
    return done;
  }

  /** Makes the staging directory visible as the checkpoint; nothing is left to discard. */
  publish(): string {
    const dir = this.store.publish(this.staging(), this.id);
    this.stagingDir = undefined;
    return dir;
  }

  /**
   * For a background snapshot: hands a duplicate of the migration socket to a guard process that
   * drains it should tlc die (see drain-guard.ts).
   */
  guardStream(socket: net.Socket): void {
    if (this.mode !== 'cow' || this.guard_) return;
    const script = fileURLToPath(new URL('./drain-guard.js', import.meta.url));
    const child = spawn(process.execPath, [script, String(process.pid)], {
      stdio: [socket, 'ignore', 'ignore'],
      detached: true,
    });
    child.on('error', () => undefined);
    child.unref();
    // Node stops reading a socket it hands to a child as stdio; tlc still reads it until it dies.
    socket.resume();
    this.guard_ = child;
  }

  /** Removes the descriptor sets handed to QEMU (their nodes are closed by then). */
  async releaseFiles(): Promise<void> {
    for (const id of this.fdsets.splice(0))
      await (this.qmp as LibvirtMonitor).executeRaw('remove-fd', { 'fdset-id': id }).catch(() => undefined);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (this.guard_?.pid && this.guard_.exitCode === null) {
      try {
        process.kill(this.guard_.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    this.qmp.close();
    try {
      this.guestRam?.close();
    } catch {
      // already closed
    }
    if (this.socketDir) fs.rmSync(this.socketDir, { recursive: true, force: true });
    void this.channel?.close().catch(() => undefined);
  }
}

/** A background snapshot sends each page once; this bounds the wait for one that is cut short. */
const BACKGROUND_SNAPSHOT_DRAIN_MS = 120_000;

function interruption(signal: AbortSignal | undefined): Error {
  const reason: unknown = signal?.reason;
  if (reason instanceof Error) return reason;
  return new InterruptedError(typeof reason === 'string' ? (reason as NodeJS.Signals) : 'SIGINT');
}

/** `cont` as soon as QEMU allows it (it refuses while a migration is being finalized). */
export async function resume(qmp: Monitor): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await qmp.execute('cont');
      return;
    } catch (err) {
      if (!(err instanceof QmpError) || err.code !== 'E_QMP_EXECUTE' || attempt > 500) throw err;
      await sleep(2);
    }
  }
}

async function resumeIfPaused(qmp: Monitor): Promise<boolean> {
  const status = await qmp.execute('query-status');
  if (status.running) return false;
  await resume(qmp);
  return true;
}
