/** The baselines' common step: a plain QEMU migration, as a user would run it, with a time limit. */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Monitor } from '../qmp/monitor.js';
import { connectVm } from '../vm/manager.js';

export interface QemuMigrationSpec {
  uri: string;
  maxBandwidthBps: number;
  backgroundSnapshot?: boolean;
  /** `stop` the VM first (stop-and-save). */
  stopFirst?: boolean;
  /** Cancel after this long and report "did not finish". */
  timeoutMs: number;
}

export interface QemuMigrationResult {
  finished: boolean;
  /** From the `migrate` (or `stop`) command until QEMU completed. */
  wallMs: number;
  /** QEMU's own `total-time`. */
  qemuTotalMs?: number;
  qemuDowntimeMs?: number;
  /** QEMU's own `setup-time`: from `migrate` until the migration is active. */
  qemuSetupMs?: number;
  bytesSent: number;
  error?: string;
}

/** QEMU's default downtime limit, set explicitly: tlc changes it on the same VM. */
const STOCK_DOWNTIME_LIMIT_MS = 300;
const POLL_MS = 20;

async function resumeIfStopped(qmp: Monitor): Promise<void> {
  if ((await qmp.execute('query-status')).status !== 'running') await qmp.execute('cont');
}

/** Runs one migration of `vm` to `spec.uri`; the VM runs again afterwards, finished or not. */
export async function runQemuMigration(vm: string, spec: QemuMigrationSpec): Promise<QemuMigrationResult> {
  const { qmp } = await connectVm(vm);
  try {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'auto-converge', state: false },
        { capability: 'background-snapshot', state: Boolean(spec.backgroundSnapshot) },
      ],
    });
    await qmp.execute('migrate-set-parameters', {
      'max-bandwidth': spec.maxBandwidthBps,
      'downtime-limit': STOCK_DOWNTIME_LIMIT_MS,
    });
    const t0 = performance.now();
    if (spec.stopFirst) await qmp.execute('stop');
    await qmp.execute('migrate', { uri: spec.uri });
    for (;;) {
      const info = await qmp.execute('query-migrate');
      const bytesSent = info.ram?.transferred ?? 0;
      if (info.status === 'completed' && (info['total-time'] ?? 0) > 0) {
        await resumeIfStopped(qmp);
        return {
          finished: true,
          wallMs: performance.now() - t0,
          ...(info['total-time'] !== undefined ? { qemuTotalMs: info['total-time'] } : {}),
          ...(info.downtime !== undefined ? { qemuDowntimeMs: info.downtime } : {}),
          ...(info['setup-time'] !== undefined ? { qemuSetupMs: info['setup-time'] } : {}),
          bytesSent,
        };
      }
      if (info.status === 'failed') {
        await resumeIfStopped(qmp);
        return {
          finished: false,
          wallMs: performance.now() - t0,
          bytesSent,
          error: info['error-desc'] ?? 'failed',
        };
      }
      if (performance.now() - t0 > spec.timeoutMs) {
        await qmp.execute('migrate_cancel');
        for (let i = 0; i < 100 && (await qmp.execute('query-migrate')).status !== 'cancelled'; i++)
          await sleep(POLL_MS);
        await resumeIfStopped(qmp);
        return { finished: false, wallMs: performance.now() - t0, bytesSent };
      }
      await sleep(POLL_MS);
    }
  } finally {
    qmp.close();
  }
}
