import type { Measurement } from './controller.js';
import type { ControlSample } from './control-trace.js';

const PAGE_SIZE = 4096;
/** Weight of the newest sample in the rate averages. */
const RATE_SMOOTHING = 0.5;
/** Samples before the rates are trusted: the first ones see QEMU's ramp-up. */
const RATE_WARMUP_SAMPLES = 3;
/** query-migrate ram.mbps is QEMU's bandwidth in 10^6 bits/s: × 125 gives bytes per ms. */
const MBPS_TO_BYTES_PER_MS = 125;
/** Samples of QEMU's bandwidth estimate the controller plans against (about a second). */
const QEMU_RATE_WINDOW = 10;

/**
 * Turns the samples of one live migration (query-migrate plus the bytes tlc received) into the
 * controller's measurements. Pure bookkeeping over a sequence of samples, so the controller's
 * tests replay recorded traces through the very code a checkpoint runs.
 */
export class MigrationObserver {
  private lastT = 0;
  private lastBytes = 0;
  private lastPages = 0;
  private samples = 0;
  private transferBps = 0;
  private scanBps = 0;
  /** Share of pages with data in the first pass, frozen when it ends. */
  private firstPassShare: number | undefined;
  private syncs = 0;
  private lastSyncT = 0;
  private lastRemaining = 0;
  private lastPagesForSync = 0;
  /** Dirty rate seen in how much the set grew at QEMU's last dirty sync (bytes/s). */
  private syncDirtyBps = 0;
  private started = false;
  /** QEMU's recent bandwidth estimates (bytes/ms), newest last. */
  private readonly qemuRates: number[] = [];

  constructor(private readonly ramBytes: number) {}

  /** Stream bytes per second recently (smoothed). */
  get sendBps(): number {
    return this.transferBps;
  }

  observe(s: ControlSample): Measurement {
    const pages = s.normal + s.duplicate;
    if (this.started && s.t > this.lastT) {
      this.samples++;
      const byteRate = ((s.received - this.lastBytes) * 1000) / (s.t - this.lastT);
      // Pages processed (sent or found zero) measure how fast QEMU works through `remaining`,
      // which counts zero pages too; stream bytes measure sending.
      const pageRate = ((pages - this.lastPages) * PAGE_SIZE * 1000) / (s.t - this.lastT);
      this.transferBps = smooth(this.transferBps, byteRate);
      this.scanBps = smooth(this.scanBps, pageRate);
    }
    this.started ||= s.status === 'active';
    this.lastBytes = s.received;
    this.lastPages = pages;
    this.lastT = s.t;
    const firstPassDone = s.syncs >= 2;
    const dataShare = pages > 0 ? s.normal / pages : 1;
    if (firstPassDone && this.firstPassShare === undefined) this.firstPassShare = dataShare;
    if (s.syncs !== this.syncs) {
      // QEMU's dirty-pages-rate counts only pages not already dirty in its bitmap, over periods of
      // a second or more: under a heavy writer it said 490 MiB/s while each sync added 880 MiB/s
      // worth of pages. What a sync adds (remaining after, minus what was left before less what
      // was processed since) over the time since the previous sync is the rate that matters.
      if (this.syncs >= 1 && s.t > this.lastSyncT) {
        const added = s.remaining - this.lastRemaining + (pages - this.lastPagesForSync) * PAGE_SIZE;
        this.syncDirtyBps = Math.max(0, (added * 1000) / (s.t - this.lastSyncT));
      }
      this.syncs = s.syncs;
      this.lastSyncT = s.t;
    }
    this.lastRemaining = s.remaining;
    this.lastPagesForSync = pages;
    const dirtyBps = Math.max(s.dirtyPagesRate * PAGE_SIZE, this.syncDirtyBps);
    // After the first pass, pages dirtied since hold data too (an allocation phase fills RAM).
    const ramDataBytes =
      this.firstPassShare === undefined
        ? this.ramBytes * dataShare
        : Math.min(this.ramBytes, this.ramBytes * this.firstPassShare + s.remaining);
    const trusted = this.samples >= RATE_WARMUP_SAMPLES;
    // QEMU re-measures its bandwidth every 100 ms and uses the newest to decide the switchover:
    // plan against the highest it showed lately (a data stretch after a zero stretch jumps 10×).
    this.qemuRates.push(s.mbps * MBPS_TO_BYTES_PER_MS);
    if (this.qemuRates.length > QEMU_RATE_WINDOW) this.qemuRates.shift();
    return {
      elapsedMs: s.t,
      remainingBytes: s.remaining,
      dirtiedSinceSyncBytes: Math.min(ramDataBytes, (dirtyBps * (s.t - this.lastSyncT)) / 1000),
      transferBps: trusted ? this.transferBps : 0,
      scanBps: trusted ? this.scanBps : 0,
      dirtyBps,
      throttlePct: s.throttlePct,
      firstPassDone,
      dataShare: this.firstPassShare ?? dataShare,
      ramBytes: this.ramBytes,
      ramDataBytes,
      qemuBytesPerMs: Math.max(...this.qemuRates),
    };
  }
}

function smooth(avg: number, sample: number): number {
  return avg === 0 ? sample : RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * avg;
}
