import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { describe, it } from 'node:test';
import type { CheckpointRun, CompareResults } from './compare-types.js';
import { renderReport } from './report.js';
import { summaryMarkdown } from './summary.js';

function run(method: CheckpointRun['method'], rep: number, extra: Partial<CheckpointRun>): CheckpointRun {
  return { ramMiB: 256, workload: 'dirty:64:random', method, rep, finished: true, ...extra };
}

const results: CompareResults = {
  stamp: { revision: 'test', cpus: 2 },
  checkpoints: [
    run('tlc live', 1, { totalMs: 900, qemuDowntimeMs: 40, bytesSent: 200 * 2 ** 20 }),
    run('tlc live', 2, { totalMs: 1100, qemuDowntimeMs: 60, bytesSent: 210 * 2 ** 20 }),
    run('stop and save', 1, { totalMs: 800, qemuDowntimeMs: 800, bytesSent: 140 * 2 ** 20 }),
    run('QEMU live (stock)', 1, { finished: false }),
  ],
  restores: [
    {
      ramMiB: 256,
      workload: 'dirty:64:random',
      method: 'tlc lazy',
      rep: 1,
      timeToRunningMs: 45,
      timeToHeartbeatMs: 120,
    },
    { ramMiB: 1024, workload: 'dirty:64:random', method: 'tlc lazy', rep: 1, timeToRunningMs: 47 },
    { ramMiB: 256, workload: 'dirty:64:random', method: 'exec:cat <file>', rep: 1, timeToRunningMs: 250 },
  ],
  timeline: {
    label: 'tlc live',
    downtimeMs: 50,
    samples: [
      { t: 0, stage: 'setup', bytes: 0, dirtyPagesRate: 0 },
      { t: 100, stage: 'stage1', bytes: 50 * 2 ** 20, dirtyPagesRate: 1000 },
      { t: 200, stage: 'stage2', bytes: 150 * 2 ** 20, dirtyPagesRate: 2000 },
    ],
  },
  notes: ['a note with <markup>'],
};

describe('benchmark report', () => {
  const html = renderReport(results);

  it('shows medians with spreads, ratios to each baseline, and unfinished baselines', () => {
    assert.match(html, /1000 ms <small>\(900–1100\)<\/small>/, 'median and range of two tlc live runs');
    assert.match(html, /tlc live \/ stop and save/);
    assert.match(html, /0\.06×/, 'QEMU downtime 50 ms / 800 ms');
    assert.match(html, /baseline did not finish/);
    assert.match(html, /<td>0\/1<\/td>/, 'stock QEMU finished 0 of 1');
  });

  it('draws the charts inline and escapes text', () => {
    assert.equal(
      (html.match(/<svg /g) ?? []).length,
      3,
      'downtime (one guest size), restore and timeline charts',
    );
    assert.match(html, /did not finish<\/title>/);
    assert.ok(html.includes('a note with &lt;markup&gt;'));
    assert.ok(!/<script/i.test(html), 'self-contained: no scripts');
  });

  it('summarizes finish counts and tlc/baseline ratios for the README', () => {
    const md = summaryMarkdown(results);
    assert.match(md, /Finished: tlc live 2\/2, stop and save 1\/1, QEMU live \(stock\) 0\/1\./);
    assert.match(md, /\| tlc live \/ stop and save \| 0\.06× \(0\.06–0\.06\)/);
    assert.match(md, /\| tlc live \/ QEMU live \(stock\) \| –; baseline unfinished in 1/);
    assert.match(md, /\| tlc lazy \| 45 ms \| 47 ms \|/);
  });

  it(
    'renders in headless Chromium to a non-blank screenshot',
    { skip: !fs.existsSync('/usr/bin/chromium') && 'Debian chromium not installed' },
    () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-report-'));
      try {
        const page = path.join(dir, 'report.html');
        const png = path.join(dir, 'report.png');
        fs.writeFileSync(page, html);
        execFileSync(
          '/usr/bin/chromium',
          [
            '--headless',
            '--no-sandbox',
            '--disable-gpu',
            '--disable-quic',
            '--no-first-run',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
            `--user-data-dir=${path.join(dir, 'profile')}`,
            '--window-size=1200,1600',
            `--screenshot=${png}`,
            `file://${page}`,
          ],
          { stdio: 'ignore', timeout: 60_000 },
        );
        const image = fs.readFileSync(png);
        assert.equal(image.subarray(1, 4).toString('latin1'), 'PNG');
        // Decode the pixel data: a blank page would be a single colour.
        const idat: Buffer[] = [];
        for (let at = 8; at < image.length;) {
          const len = image.readUInt32BE(at);
          const type = image.toString('latin1', at + 4, at + 8);
          if (type === 'IDAT') idat.push(image.subarray(at + 8, at + 8 + len));
          at += 12 + len;
        }
        const pixels = zlib.inflateSync(Buffer.concat(idat));
        const distinct = new Set<number>();
        for (let i = 0; i < pixels.length && distinct.size < 64; i += 97) distinct.add(pixels[i] as number);
        assert.ok(distinct.size >= 16, `screenshot looks blank (${distinct.size} distinct byte values)`);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});
