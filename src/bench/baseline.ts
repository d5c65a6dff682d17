/** The baselines' common steps: a plain QEMU migration, and a plain QEMU `-incoming` restore. */
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Monitor } from '../qmp/monitor.js';
import { launchQemu } from '../vm/launch.js';
import { connectVm } from '../vm/manager.js';
import { isAlive, kill, waitExit } from '../vm/process.js';
import { loadVm, runtimePaths } from '../vm/registry.js';

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

const INCOMING_TIMEOUT_MS = 120_000;

/**
 * Plain QEMU restore: starts VM `vm`'s QEMU again as `name` with `-incoming <incoming>` and
 * returns the ms from spawn until it runs; the QEMU is killed afterwards. A stream of a stopped
 * VM (saved like tlc's stop mode) ends paused: it is resumed, as tlc's restore does.
 */
export async function timeIncomingToRunning(vm: string, name: string, incoming: string): Promise<number> {
  const spec = { ...loadVm(vm).spec, name };
  const paths = runtimePaths(name);
  const dir = path.dirname(paths.qmpSocket);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const launched = await launchQemu(spec, { ...paths, incoming }, { logFile: path.join(dir, 'qemu.log') });
  try {
    for (;;) {
      const s = await launched.qmp.execute('query-status');
      if (s.status === 'running') return performance.now() - launched.spawnedAt;
      if (s.status === 'paused' && (await launched.qmp.execute('query-migrate')).status === 'completed')
        await launched.qmp.execute('cont');
      if (!isAlive(launched.process)) throw new Error(`incoming QEMU exited (see ${dir}/qemu.log)`);
      if (performance.now() - launched.spawnedAt > INCOMING_TIMEOUT_MS)
        throw new Error(`incoming QEMU not running after ${INCOMING_TIMEOUT_MS} ms (see ${dir}/qemu.log)`);
      await sleep(2);
    }
  } finally {
    launched.qmp.close();
    kill(launched.process);
    await waitExit(launched.process, 3000);
  }
}
