import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { type ConsoleScan, scanConsole } from './heartbeat.js';

/** Watches a guest's console for `ms` and returns what it printed (read once at the end). */
export async function observeGuest(consoleLog: string, ms: number): Promise<ConsoleScan> {
  await sleep(ms);
  return scanConsole(fs.readFileSync(consoleLog, 'latin1'));
}

/**
 * Did a restored guest continue rather than reboot, with its memory intact? `seqBefore` is the
 * newest heartbeat seen before the checkpoint was taken.
 */
export function continuationProblems(scan: ConsoleScan, seqBefore: number | undefined): string[] {
  const problems: string[] = [];
  if (scan.boots > 0) problems.push(`guest booted again (${scan.boots} boot line(s)) instead of continuing`);
  if (scan.heartbeats.length === 0) problems.push('no heartbeat after the restore');
  const first = scan.heartbeats[0];
  if (first && seqBefore !== undefined && first.seq < seqBefore) {
    problems.push(
      `heartbeat sequence went back: first seq ${first.seq} after restore, ${seqBefore} before the checkpoint`,
    );
  }
  for (let i = 1; i < scan.heartbeats.length; i++) {
    const prev = scan.heartbeats[i - 1];
    const cur = scan.heartbeats[i];
    if (prev && cur && cur.seq !== prev.seq + 1)
      problems.push(`heartbeat seq jumped from ${prev.seq} to ${cur.seq}`);
  }
  if (scan.corruptions.length > 0) {
    const c = scan.corruptions[0];
    problems.push(
      `memverify found ${scan.corruptions.length} corrupt page(s), first: page ${c?.page} offset ${c?.offset}`,
    );
  }
  const lastCorrupt = scan.heartbeats.at(-1);
  if (lastCorrupt?.kind === 'memverify' && lastCorrupt.corrupt > 0)
    problems.push(`memverify counts ${lastCorrupt.corrupt} corruptions`);
  return problems;
}
