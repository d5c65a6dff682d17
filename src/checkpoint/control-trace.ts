import fs from 'node:fs';
import { PRIVATE_FILE_MODE } from '../core/paths.js';

/**
 * One controller tick as QEMU and tlc saw it. Recorded traces of real runs are the controller's
 * test fixtures (`test/fixtures/control-traces/`): what the guest dirtied and how fast the host
 * sent, under which load.
 */
export interface ControlSample {
  /** ms since the deadline clock started. */
  t: number;
  status: string;
  /** query-migrate ram.remaining: bytes QEMU still counts as dirty (unscanned zero pages included). */
  remaining: number;
  /** Pages sent with data / found zero so far (ram.normal, ram.duplicate). */
  normal: number;
  duplicate: number;
  /** Stream bytes tlc received so far. */
  received: number;
  dirtyPagesRate: number;
  throttlePct: number;
  /** QEMU's dirty-sync-count: 1 during the first pass. */
  syncs: number;
  /** QEMU's bandwidth estimate (ram.mbps). */
  mbps: number;
  stopped: boolean;
  /** The controller's projection at this tick (see controller.ts Plan), ms and bytes. */
  plan?: Record<string, number | null>;
  /** What the controller did at this tick, if anything. */
  action?: string;
}

export interface ControlTrace {
  ramBytes: number;
  deadlineMs: number;
  maxDowntimeMs: number;
  samples: ControlSample[];
}

/** Debug and fixture aid: `TLC_CONTROL_TRACE=<file>` keeps the last live checkpoint's trace. */
export function saveControlTrace(trace: ControlTrace): void {
  const file = process.env.TLC_CONTROL_TRACE;
  if (!file) return;
  fs.writeFileSync(file, `${JSON.stringify(trace)}\n`, { mode: PRIVATE_FILE_MODE });
}
