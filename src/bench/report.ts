/**
 * Renders benchmark results as one self-contained HTML page: tables of every metric with tlc's
 * ratio to each baseline, and inline SVG charts (no scripts, no external files), so the page can
 * be archived beside its JSON and opened anywhere.
 */
import type { CheckpointMethod, CheckpointRun, CompareResults, RestoreRun } from './compare-types.js';
import { type Summary, summarize } from './stats.js';

const TLC_METHODS: CheckpointMethod[] = ['tlc live', 'tlc cow', 'tlc auto'];
const BASELINES: CheckpointMethod[] = [
  'stop and save',
  'QEMU live (stock)',
  'QEMU live (unlimited)',
  'QEMU background-snapshot',
];
const COLORS = ['#1b6ca8', '#3fa34d', '#7e57c2', '#d1495b', '#edae49', '#8d99ae', '#00798c'];

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function fmt(s: Summary | undefined, unit: string, digits = 0): string {
  if (!s) return '–';
  const v = (x: number): string => x.toFixed(digits);
  return s.n > 1
    ? `${v(s.median)} ${unit} <small>(${v(s.min)}–${v(s.max)})</small>`
    : `${v(s.median)} ${unit}`;
}

type Metric = {
  key: keyof CheckpointRun;
  label: string;
  unit: string;
  scale?: number;
  digits?: number;
  lowerIsBetter: boolean;
};

const METRICS: Metric[] = [
  { key: 'totalMs', label: 'total time', unit: 'ms', lowerIsBetter: true },
  { key: 'qemuDowntimeMs', label: 'QEMU downtime', unit: 'ms', lowerIsBetter: true },
  { key: 'guestMaxStallMs', label: 'guest longest stall', unit: 'ms', digits: 1, lowerIsBetter: true },
  { key: 'guestRateRatio', label: 'guest rate during/before', unit: '', digits: 2, lowerIsBetter: false },
  { key: 'bytesSent', label: 'bytes sent', unit: 'MiB', scale: 2 ** -20, lowerIsBetter: true },
  { key: 'bytesStored', label: 'bytes stored', unit: 'MiB', scale: 2 ** -20, lowerIsBetter: true },
  { key: 'durableMs', label: 'time until durable', unit: 'ms', lowerIsBetter: true },
  { key: 'peakRssMiB', label: 'tlc peak memory', unit: 'MiB', lowerIsBetter: true },
];

function metricSummary(runs: CheckpointRun[], m: Metric): Summary | undefined {
  const values = runs.filter((r) => r.finished).map((r) => r[m.key]);
  return summarize(values.filter((v): v is number => typeof v === 'number').map((v) => v * (m.scale ?? 1)));
}

function groupKey(r: { ramMiB: number; workload: string }): string {
  return `${r.ramMiB} MiB · ${r.workload}`;
}

function groups<T extends { ramMiB: number; workload: string }>(runs: T[]): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const r of runs) out.set(groupKey(r), [...(out.get(groupKey(r)) ?? []), r]);
  return out;
}

function checkpointTable(key: string, runs: CheckpointRun[]): string {
  const methods = [...TLC_METHODS, ...BASELINES].filter((m) => runs.some((r) => r.method === m));
  const head = `<tr><th>method</th><th>finished</th>${METRICS.map((m) => `<th>${m.label}</th>`).join('')}</tr>`;
  const rows = methods.map((method) => {
    const mine = runs.filter((r) => r.method === method);
    const done = mine.filter((r) => r.finished).length;
    const cells = METRICS.map((m) => `<td>${fmt(metricSummary(mine, m), m.unit, m.digits ?? 0)}</td>`).join(
      '',
    );
    const cls = method.startsWith('tlc') ? ' class="tlc"' : '';
    return `<tr${cls}><td>${esc(method)}</td><td>${done}/${mine.length}</td>${cells}</tr>`;
  });
  return `<h3>${esc(key)}</h3><table>${head}${rows.join('')}</table>${ratioTable(runs)}`;
}

/** tlc's median divided by each baseline's median, per metric; marks where tlc is better. */
function ratioTable(runs: CheckpointRun[]): string {
  const rows: string[] = [];
  for (const mine of TLC_METHODS) {
    const tlcRuns = runs.filter((r) => r.method === mine);
    if (tlcRuns.length === 0) continue;
    for (const base of BASELINES) {
      const baseRuns = runs.filter((r) => r.method === base);
      if (baseRuns.length === 0) continue;
      const cells = METRICS.map((m) => {
        const a = metricSummary(tlcRuns, m);
        const b = metricSummary(baseRuns, m);
        if (!a || !b || b.median === 0) {
          const unfinished = baseRuns.every((r) => !r.finished);
          return `<td>${unfinished ? '<span class="win">baseline did not finish</span>' : '–'}</td>`;
        }
        const ratio = a.median / b.median;
        const better = m.lowerIsBetter ? ratio < 1 : ratio > 1;
        const cls = Math.abs(ratio - 1) < 0.02 ? 'even' : better ? 'win' : 'loss';
        return `<td class="${cls}">${ratio.toFixed(2)}×</td>`;
      }).join('');
      rows.push(`<tr><td>${esc(mine)} / ${esc(base)}</td><td></td>${cells}</tr>`);
    }
  }
  if (rows.length === 0) return '';
  return `<table class="ratios"><tr><th>ratio</th><th></th>${METRICS.map((m) => `<th>${m.label}</th>`).join('')}</tr>${rows.join('')}</table>`;
}

interface Bar {
  group: string;
  series: string;
  value: number | undefined;
}

/** Grouped bar chart; an absent value is drawn as a hatched "did not finish" bar. */
export function barChart(title: string, unit: string, bars: Bar[]): string {
  const groupNames = [...new Set(bars.map((b) => b.group))];
  const seriesNames = [...new Set(bars.map((b) => b.series))];
  const max = Math.max(1, ...bars.map((b) => b.value ?? 0));
  const barW = 14;
  const gap = 18;
  const groupW = seriesNames.length * barW + gap;
  const h = 220;
  const left = 50;
  const width = left + groupNames.length * groupW + 20;
  const y = (v: number): number => 20 + (h - 20) * (1 - v / max);
  const parts: string[] = [];
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    parts.push(`<line x1="${left}" x2="${width - 10}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
    parts.push(
      `<text x="${left - 4}" y="${y(v) + 4}" text-anchor="end" font-size="10">${v.toFixed(v < 10 ? 1 : 0)}</text>`,
    );
  }
  groupNames.forEach((g, gi) => {
    const x0 = left + gi * groupW + gap / 2;
    seriesNames.forEach((s, si) => {
      const bar = bars.find((b) => b.group === g && b.series === s);
      if (!bar) return;
      const x = x0 + si * barW;
      const color = COLORS[si % COLORS.length] as string;
      if (bar.value === undefined) {
        parts.push(
          `<rect x="${x}" y="${y(max)}" width="${barW - 2}" height="${h - y(max)}" fill="url(#dnf)" stroke="${color}"><title>${esc(s)}: did not finish</title></rect>`,
        );
      } else {
        parts.push(
          `<rect x="${x}" y="${y(bar.value)}" width="${barW - 2}" height="${h - y(bar.value)}" fill="${color}"><title>${esc(s)}: ${bar.value.toFixed(1)} ${unit}</title></rect>`,
        );
      }
    });
    parts.push(
      `<text x="${x0 + (seriesNames.length * barW) / 2}" y="${h + 14}" text-anchor="middle" font-size="10">${esc(g)}</text>`,
    );
  });
  const legend = seriesNames
    .map((s, si) => `<span><i style="background:${COLORS[si % COLORS.length]}"></i>${esc(s)}</span>`)
    .join('');
  return `<figure><figcaption>${esc(title)} (${esc(unit)})</figcaption><svg width="${width}" height="${h + 24}" role="img">
<defs><pattern id="dnf" width="6" height="6" patternUnits="userSpaceOnUse"><path d="M0,6 L6,0" stroke="#999"/></pattern></defs>${parts.join('')}</svg><div class="legend">${legend}</div></figure>`;
}

/** A line chart of (x, y) series. */
export function lineChart(
  title: string,
  xLabel: string,
  yLabel: string,
  series: { name: string; points: [number, number][] }[],
): string {
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) return '';
  const maxX = Math.max(1, ...all.map((p) => p[0]));
  const maxY = Math.max(1, ...all.map((p) => p[1]));
  const w = 520;
  const h = 220;
  const left = 50;
  const x = (v: number): number => left + ((w - left - 20) * v) / maxX;
  const y = (v: number): number => 20 + (h - 40) * (1 - v / maxY);
  const lines = series.map((s, i) => {
    const color = COLORS[i % COLORS.length] as string;
    const pts = s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    const dots = s.points
      .map((p) => `<circle cx="${x(p[0]).toFixed(1)}" cy="${y(p[1]).toFixed(1)}" r="3" fill="${color}"/>`)
      .join('');
    return `<polyline fill="none" stroke="${color}" stroke-width="2" points="${pts}"/>${dots}`;
  });
  const axes = `<line x1="${left}" y1="${h - 20}" x2="${w - 10}" y2="${h - 20}" stroke="#333"/><line x1="${left}" y1="20" x2="${left}" y2="${h - 20}" stroke="#333"/>
<text x="${w / 2}" y="${h}" text-anchor="middle" font-size="11">${esc(xLabel)} (max ${maxX.toFixed(0)})</text>
<text x="12" y="${h / 2}" font-size="11" transform="rotate(-90 12 ${h / 2})" text-anchor="middle">${esc(yLabel)} (max ${maxY.toFixed(0)})</text>`;
  const legend = series
    .map((s, i) => `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(s.name)}</span>`)
    .join('');
  return `<figure><figcaption>${esc(title)}</figcaption><svg width="${w}" height="${h + 4}" role="img">${axes}${lines.join('')}</svg><div class="legend">${legend}</div></figure>`;
}

/** One downtime chart per guest size: sizes differ by an order of magnitude. */
function downtimeChart(checkpoints: CheckpointRun[]): string {
  return [...new Set(checkpoints.map((r) => r.ramMiB))]
    .map((ramMiB) => {
      const bars: Bar[] = [];
      const runs = checkpoints.filter((r) => r.ramMiB === ramMiB);
      for (const workload of [...new Set(runs.map((r) => r.workload))]) {
        for (const method of [...new Set(runs.map((r) => r.method))]) {
          const mine = runs.filter((r) => r.workload === workload && r.method === method);
          if (mine.length === 0) continue;
          const s = summarize(
            mine
              .filter((r) => r.finished && r.qemuDowntimeMs !== undefined)
              .map((r) => r.qemuDowntimeMs as number),
          );
          bars.push({ group: workload, series: method, value: s?.median });
        }
      }
      return barChart(
        `Downtime per method and workload, ${ramMiB} MiB guest (QEMU-reported, median)`,
        'ms',
        bars,
      );
    })
    .join('');
}

function restoreChart(restores: RestoreRun[]): string {
  const methods = [...new Set(restores.map((r) => r.method))];
  return lineChart(
    'Restore: QEMU start to guest running, by guest RAM (median)',
    'guest RAM, MiB',
    'ms',
    methods.map((method) => {
      const sizes = [...new Set(restores.filter((r) => r.method === method).map((r) => r.ramMiB))].sort(
        (a, b) => a - b,
      );
      return {
        name: method,
        points: sizes.map((size): [number, number] => [
          size,
          summarize(
            restores.filter((r) => r.method === method && r.ramMiB === size).map((r) => r.timeToRunningMs),
          )?.median ?? 0,
        ]),
      };
    }),
  );
}

function timelineChart(results: CompareResults): string {
  const tl = results.timeline;
  if (!tl || tl.samples.length === 0) return '';
  const bytes = tl.samples.map((s): [number, number] => [s.t, s.bytes / 2 ** 20]);
  const dirty = tl.samples.map((s): [number, number] => [s.t, (s.dirtyPagesRate * 4096) / 2 ** 20]);
  const stages = [...new Set(tl.samples.map((s) => s.stage))]
    .map((st) => {
      const of = tl.samples.filter((s) => s.stage === st);
      return `${esc(st)} ${Math.round(of[0]?.t ?? 0)}–${Math.round(of.at(-1)?.t ?? 0)} ms`;
    })
    .join(' · ');
  return `${lineChart(
    `Timeline of one checkpoint: ${tl.label}`,
    'ms since start',
    'MiB received / dirty MiB/s',
    [
      { name: 'MiB received', points: bytes },
      { name: 'guest dirty rate, MiB/s', points: dirty },
    ],
  )}<p class="stages">Stages: ${stages}; downtime ${tl.downtimeMs.toFixed(0)} ms.</p>`;
}

function restoreTable(restores: RestoreRun[]): string {
  const rows: string[] = [];
  for (const [g, runs] of groups(restores)) {
    for (const method of [...new Set(runs.map((r) => r.method))]) {
      const mine = runs.filter((r) => r.method === method);
      const ttr = summarize(mine.map((r) => r.timeToRunningMs));
      const hb = summarize(
        mine.flatMap((r) => (r.timeToHeartbeatMs !== undefined ? [r.timeToHeartbeatMs] : [])),
      );
      rows.push(
        `<tr${method.startsWith('tlc') ? ' class="tlc"' : ''}><td>${esc(g)}</td><td>${esc(method)}</td><td>${fmt(ttr, 'ms')}</td><td>${fmt(hb, 'ms')}</td></tr>`,
      );
    }
  }
  return `<table><tr><th>guest</th><th>method</th><th>time to running</th><th>time to first heartbeat</th></tr>${rows.join('')}</table>`;
}

export function renderReport(results: CompareResults): string {
  const stamp = Object.entries(results.stamp)
    .map(([k, v]) => `<span><b>${esc(k)}</b> ${esc(String(v))}</span>`)
    .join(' ');
  const tables = [...groups(results.checkpoints)].map(([key, runs]) => checkpointTable(key, runs)).join('');
  const notes = results.notes.map((n) => `<li>${esc(n)}</li>`).join('');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tlc benchmark</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin:0 0 4px}.stamp span{margin-right:14px;color:#555}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.tlc{background:#eef5fb}small{color:#777}
.win{color:#1a7f37;font-weight:600}.loss{color:#b3261e}.ratios td{font-size:12px}
figure{display:inline-block;margin:8px 24px 16px 0;vertical-align:top}figcaption{font-weight:600;margin-bottom:4px}
.legend span{margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
</style></head><body>
<h1>tlc benchmark</h1><div class="stamp">${stamp}</div>
<h2>Charts</h2>${downtimeChart(results.checkpoints)}${restoreChart(results.restores)}${timelineChart(results)}
<h2>Checkpoints</h2><p>Medians over repetitions, range in brackets; ratios are tlc's median over the baseline's (green: tlc better).</p>${tables}
<h2>Restores</h2>${restoreTable(results.restores)}
<h2>Notes</h2><ul>${notes}</ul>
</body></html>
`;
}
