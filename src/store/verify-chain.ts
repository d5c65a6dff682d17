import { TlcError, errorText } from '../core/errors.js';
import { ramChain } from './chain.js';
import type { CheckpointStore, StoredCheckpoint } from './store.js';
import type { VerifyReport } from './verify.js';

export interface DamagedLink {
  /** The damaged (or unreadable) checkpoint. */
  id: string;
  /** Every checkpoint whose RAM needs it (itself included), oldest first. */
  affects: string[];
}

export interface ChainVerifyReport extends VerifyReport {
  /** The RAM chain checked, newest first (just the checkpoint when it is full). */
  chain: string[];
  damaged: DamagedLink[];
}

/**
 * Verifies a checkpoint together with every checkpoint its RAM builds on: a parent's problems are
 * the child's (it cannot be restored without them), reported with the parent's id and with every
 * checkpoint of the store the damage reaches.
 */
export function verifyRamChain(
  store: CheckpointStore,
  ckpt: StoredCheckpoint,
  verifyOne: (c: StoredCheckpoint) => VerifyReport,
): ChainVerifyReport {
  const own = verifyOne(ckpt);
  const problems = [...own.problems];
  let bytesChecked = own.bytesChecked;
  const damaged: DamagedLink[] = [];
  if (!own.ok) damaged.push({ id: ckpt.id, affects: dependentsOf(store, ckpt.id) });
  let chain: StoredCheckpoint[] = [ckpt];
  try {
    chain = ramChain(ckpt, (id) => store.exact(id));
  } catch (err) {
    problems.push(err instanceof TlcError ? err.message : errorText(err));
    const missing = ckpt.manifest.parent;
    if (missing) damaged.push({ id: missing, affects: dependentsOf(store, missing) });
  }
  for (const parent of chain.slice(1)) {
    const r = verifyOne(parent);
    bytesChecked += r.bytesChecked;
    if (r.ok) continue;
    for (const p of r.problems) problems.push(`parent ${parent.id}: ${p}`);
    damaged.push({ id: parent.id, affects: dependentsOf(store, parent.id) });
  }
  return {
    ...own,
    ok: problems.length === 0,
    problems,
    bytesChecked,
    chain: chain.map((c) => c.id),
    damaged,
  };
}

/** `id` and every checkpoint whose RAM chain runs through it, oldest first. */
export function dependentsOf(store: CheckpointStore, id: string): string[] {
  const all = store.list();
  const parentOf = new Map(all.map((c) => [c.id, c.manifest.parent]));
  return [
    id,
    ...all
      .filter((c) => {
        const seen = new Set<string>();
        for (let p = c.manifest.parent; p !== undefined && !seen.has(p); p = parentOf.get(p)) {
          if (p === id) return true;
          seen.add(p);
        }
        return false;
      })
      .map((c) => c.id),
  ];
}
