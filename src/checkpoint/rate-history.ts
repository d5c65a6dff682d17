import type { StoredCheckpoint } from '../store/store.js';

/**
 * What earlier checkpoints of a VM tell the controller about this host: how fast the stopped
 * stage sends, and what the TCG fix-up costs per MiB. The rate measured while the guest runs
 * says little about the stopped stage: on a 2-core TCG host a 1 GiB guest's stopped stage sent
 * 1-2 GB/s while pre-copy beside it measured 0.3-0.6 GB/s (vCPU, sender and receiver share the
 * cores until the vCPU stops).
 */
export interface LearnedRates {
  stopRateBps?: number;
  fixupMsPerMiB?: number;
}

/** Sets below this are dominated by fixed stop costs and say nothing about the rate. */
const MIN_RATE_SAMPLE_BYTES = 32 * 1024 * 1024;
const MAX_SAMPLES = 5;

export function learnedRates(previous: readonly StoredCheckpoint[]): LearnedRates {
  const recent = [...previous]
    .sort((a, b) => a.manifest.createdAt.localeCompare(b.manifest.createdAt))
    .slice(-3 * MAX_SAMPLES);
  const rates: number[] = [];
  const fixups: number[] = [];
  for (const { manifest } of recent) {
    const m = manifest.metrics;
    if (manifest.mode === 'live' && m.qemuDowntimeMs && m.stage3.bytes >= MIN_RATE_SAMPLE_BYTES)
      rates.push(m.stage3.bytes / (m.qemuDowntimeMs / 1000));
    if (manifest.mode === 'stop' && m.stage1.ms > 0 && m.stage1.bytes >= MIN_RATE_SAMPLE_BYTES)
      rates.push(m.stage1.bytes / (m.stage1.ms / 1000));
    if (m.tcgFixup && manifest.vm.memMiB > 0) fixups.push(m.tcgFixup.ms / manifest.vm.memMiB);
  }
  const out: LearnedRates = {};
  const rate = median(rates.slice(-MAX_SAMPLES));
  // The fix-up is paid in full while the VM is stopped: plan with the worst recent one.
  const fixup = fixups.length > 0 ? Math.max(...fixups.slice(-MAX_SAMPLES)) : undefined;
  if (rate !== undefined) out.stopRateBps = rate;
  if (fixup !== undefined) out.fixupMsPerMiB = fixup;
  return out;
}

function median(xs: readonly number[]): number | undefined {
  if (xs.length === 0) return undefined;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}
