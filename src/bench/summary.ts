/**
 * A short Markdown summary of a comparison run, for the README: per guest size, how often each
 * method finished, and tlc's median ratio to each baseline over all workloads.
 */
import type { CheckpointMethod, CheckpointRun, CompareResults } from './compare-types.js';
import { summarize } from './stats.js';

const TLC: CheckpointMethod[] = ['tlc live', 'tlc cow'];
const BASELINES: CheckpointMethod[] = [
  'stop and save',
  'QEMU live (stock)',
  'QEMU live (unlimited)',
  'QEMU background-snapshot',
];
const RATIO_METRICS: { key: keyof CheckpointRun; label: string }[] = [
  { key: 'qemuDowntimeMs', label: 'downtime' },
  { key: 'totalMs', label: 'total time' },
  { key: 'guestMaxStallMs', label: 'longest guest stall' },
];

function median(runs: CheckpointRun[], key: keyof CheckpointRun): number | undefined {
  return summarize(
    runs.filter((r) => r.finished).flatMap((r) => (typeof r[key] === 'number' ? [r[key] as number] : [])),
  )?.median;
}

export function summaryMarkdown(results: CompareResults): string {
  const lines: string[] = [];
  for (const ramMiB of [...new Set(results.checkpoints.map((r) => r.ramMiB))]) {
    const runs = results.checkpoints.filter((r) => r.ramMiB === ramMiB);
    const workloads = [...new Set(runs.map((r) => r.workload))];
    const finished = [...TLC, 'tlc auto' as CheckpointMethod, ...BASELINES]
      .map((m) => {
        const mine = runs.filter((r) => r.method === m);
        return mine.length ? `${m} ${mine.filter((r) => r.finished).length}/${mine.length}` : '';
      })
      .filter(Boolean)
      .join(', ');
    lines.push(`**${ramMiB} MiB guest** (${workloads.length} workloads). Finished: ${finished}.`, '');
    lines.push(
      `| tlc / baseline (median over workloads of per-workload medians) | ${RATIO_METRICS.map((m) => m.label).join(' | ')} |`,
    );
    lines.push(`|---|${RATIO_METRICS.map(() => '---').join('|')}|`);
    for (const mine of TLC) {
      for (const base of BASELINES) {
        const cells = RATIO_METRICS.map((metric) => {
          const ratios: number[] = [];
          let unfinished = 0;
          for (const w of workloads) {
            const a = median(
              runs.filter((r) => r.workload === w && r.method === mine),
              metric.key,
            );
            const baseRuns = runs.filter((r) => r.workload === w && r.method === base);
            const b = median(baseRuns, metric.key);
            if (baseRuns.length > 0 && baseRuns.every((r) => !r.finished)) unfinished++;
            if (a !== undefined && b !== undefined && b > 0) ratios.push(a / b);
          }
          const s = summarize(ratios);
          const text = s ? `${s.median.toFixed(2)}× (${s.min.toFixed(2)}–${s.max.toFixed(2)})` : '–';
          return unfinished ? `${text}; baseline unfinished in ${unfinished}` : text;
        });
        lines.push(`| ${mine} / ${base} | ${cells.join(' | ')} |`);
      }
    }
    lines.push('');
  }
  const restoreSizes = [...new Set(results.restores.map((r) => r.ramMiB))];
  if (restoreSizes.length) {
    lines.push(
      '| restore, QEMU start to running (median) | ' + restoreSizes.map((s) => `${s} MiB`).join(' | ') + ' |',
    );
    lines.push('|---|' + restoreSizes.map(() => '---').join('|') + '|');
    for (const method of [...new Set(results.restores.map((r) => r.method))]) {
      const cells = restoreSizes.map((size) => {
        const s = summarize(
          results.restores
            .filter((r) => r.method === method && r.ramMiB === size)
            .map((r) => r.timeToRunningMs),
        );
        return s ? `${s.median.toFixed(0)} ms` : '–';
      });
      lines.push(`| ${method} | ${cells.join(' | ')} |`);
    }
  }
  return lines.join('\n') + '\n';
}
