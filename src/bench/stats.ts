/** Median and spread over repetitions; benchmarks report both, never a single run. */
export interface Summary {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function summarize(values: readonly number[]): Summary | undefined {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return undefined;
  const sorted = [...finite].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const median =
    sorted.length % 2 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
  return { median, min: sorted[0] as number, max: sorted.at(-1) as number, n: sorted.length };
}

/** `{ [key]: v }` when there is a summary, else nothing: for spreading into a result row. */
export function optSummary<K extends string>(key: K, v: Summary | undefined): Partial<Record<K, Summary>> {
  return v ? ({ [key]: v } as Record<K, Summary>) : {};
}

/** "median (min–max)" in whole units, or "–". */
export function formatSummary(s: Summary | undefined): string {
  if (!s) return '–';
  return s.n > 1 ? `${s.median.toFixed(0)} (${s.min.toFixed(0)}–${s.max.toFixed(0)})` : s.median.toFixed(0);
}
