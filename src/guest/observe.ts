import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { type ConsoleScan, scanConsole } from './heartbeat.js';

/** Watches a guest's console for `ms` and returns what it printed (read once at the end). */
export async function observeGuest(consoleLog: string, ms: number): Promise<ConsoleScan> {
  await sleep(ms);
  return scanConsole(fs.readFileSync(consoleLog, 'latin1'));
}

/**
 * Did a restored guest continue rather than reboot, with its memory (and disk) intact? `seqBefore`
 * is the newest memory-workload heartbeat seen before the checkpoint was taken. Heartbeats are
 * checked per workload: memverify/dirty/idle count up by one, diskverify's synced record numbers
 * only grow (a combined guest interleaves both).
 */
export function continuationProblems(scan: ConsoleScan, seqBefore: number | undefined): string[] {
  const problems: string[] = [];
  if (scan.boots > 0) problems.push(`guest booted again (${scan.boots} boot line(s)) instead of continuing`);
  if (scan.heartbeats.length === 0) problems.push('no heartbeat after the restore');
  const memory = scan.heartbeats.filter((h) => h.kind !== 'diskverify');
  const disk = scan.heartbeats.filter((h) => h.kind === 'diskverify');
  const first = memory[0];
  if (first && seqBefore !== undefined && first.seq < seqBefore) {
    problems.push(
      `heartbeat sequence went back: first seq ${first.seq} after restore, ${seqBefore} before the checkpoint`,
    );
  }
  for (let i = 1; i < memory.length; i++) {
    const prev = memory[i - 1];
    const cur = memory[i];
    if (prev && cur && cur.seq !== prev.seq + 1)
      problems.push(`heartbeat seq jumped from ${prev.seq} to ${cur.seq}`);
  }
  for (let i = 1; i < disk.length; i++) {
    const prev = disk[i - 1];
    const cur = disk[i];
    if (prev && cur && cur.seq <= prev.seq)
      problems.push(`diskverify synced seq went from ${prev.seq} back to ${cur.seq}`);
  }
  if (scan.corruptions.length > 0) {
    const c = scan.corruptions[0];
    problems.push(
      `memverify found ${scan.corruptions.length} corrupt page(s), first: page ${c?.page} offset ${c?.offset}`,
    );
  }
  const lastCorrupt = memory.at(-1);
  if (lastCorrupt?.kind === 'memverify' && lastCorrupt.corrupt > 0)
    problems.push(`memverify counts ${lastCorrupt.corrupt} corruptions`);
  for (const v of scan.diskVerdicts) {
    if (!v.ok)
      problems.push(`diskverify: record ${v.record} is bad (${v.reason}) after ${v.valid} good ones`);
  }
  return problems;
}
