/** Results of `npm run bench` (src/bench/compare.ts), as saved to JSON and read by the report. */

export type CheckpointMethod =
  | 'tlc live'
  | 'tlc cow'
  | 'tlc auto'
  | 'stop and save'
  | 'QEMU live (stock)'
  | 'QEMU live (unlimited)'
  | 'QEMU background-snapshot';

export type RestoreMethod = 'tlc lazy' | 'tlc eager' | 'exec:cat <file>';

export interface CheckpointRun {
  ramMiB: number;
  workload: string;
  method: CheckpointMethod;
  rep: number;
  finished: boolean;
  /** Start of the checkpoint until the VM runs again (or until QEMU completed, for baselines). */
  totalMs?: number;
  /** QEMU's own `downtime`. */
  qemuDowntimeMs?: number;
  /** Longest gap between two loop iterations the guest saw during the checkpoint. */
  guestMaxStallMs?: number;
  /** Guest work rate during the checkpoint / before it (1 = unaffected). */
  guestRateRatio?: number;
  bytesSent?: number;
  bytesStored?: number;
  /** Until the checkpoint was on disk, fsynced. */
  durableMs?: number;
  /** Peak resident memory of tlc's process. */
  peakRssMiB?: number;
}

export interface RestoreRun {
  ramMiB: number;
  workload: string;
  method: RestoreMethod;
  rep: number;
  /** QEMU process start until the guest runs. */
  timeToRunningMs: number;
  /** QEMU process start until the guest's first heartbeat after the restore. */
  timeToHeartbeatMs?: number;
}

/** One checkpoint's progress over time, for the timeline chart. */
export interface TimelineSample {
  t: number;
  stage: string;
  bytes: number;
  dirtyPagesRate: number;
}

export interface CompareResults {
  stamp: Record<string, unknown>;
  checkpoints: CheckpointRun[];
  restores: RestoreRun[];
  timeline?: { label: string; samples: TimelineSample[]; downtimeMs: number };
  notes: string[];
}
