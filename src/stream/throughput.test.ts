/**
 * A quick throughput number (printed, not asserted): synthesize a stream of PAGE records
 * (TLC_STREAM_BENCH_MIB, default 1024 MiB of guest RAM) with the writer in 1 MiB chunks, then parse
 * it fed as those chunks and as 64 KiB socket-sized pieces (records then span chunks). Median of 3
 * runs after a warm-up.
 */
import assert from 'node:assert/strict';
import { it } from 'node:test';
import { loadFixture } from './fixtures/index.js';
import { parseStream } from './fixtures/model.js';
import { MigrationStreamReader, type StreamSink } from './reader.js';
import { MigrationStreamWriter } from './writer.js';

const MiB = 1024 * 1024;
const PAGE = 4096;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

it('throughput: parse a large synthetic PAGE stream', { timeout: 300_000 }, () => {
  const ramBytes = Number(process.env.TLC_STREAM_BENCH_MIB ?? 1024) * MiB;
  const fixture = parseStream(loadFixture('precopyStopped'));
  const chunks: Buffer[] = [];
  const w = new MigrationStreamWriter((c) => void chunks.push(c));
  const t0 = process.hrtime.bigint();
  w.header(fixture.configRaw);
  w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, [{ name: 'ram0', usedLength: ramBytes }], {
    ignoreShared: false,
  });
  const page = Buffer.alloc(PAGE, 0x5a);
  w.beginRamPart();
  for (let off = 0; off < ramBytes; off += PAGE) {
    if (off % MiB === 0 && off > 0) {
      w.endRamSection();
      w.beginRamPart();
    }
    page.writeUInt32LE(off, 0);
    w.page(0, off, page);
  }
  w.endRamSection();
  w.ramEnd();
  w.deviceState(fixture.deviceBlob as Buffer);
  void w.flush();
  const writeNs = Number(process.hrtime.bigint() - t0);
  const streamBytes = chunks.reduce((n, c) => n + c.length, 0);

  let pages = 0;
  let check = 0;
  const sink: StreamSink = {
    onConfiguration() {},
    onRamStart() {},
    onBlockList() {},
    onPage(_b, _o, p) {
      pages++;
      check += p[PAGE - 1] as number;
    },
    onZeroPage() {},
    onXbzrlePage() {},
    onRamSectionEnd() {},
    onDeviceState() {},
  };
  const socketSized: Buffer[] = [];
  for (const c of chunks)
    for (let i = 0; i < c.length; i += 64 * 1024) socketSized.push(c.subarray(i, i + 64 * 1024));

  const run = (input: Buffer[]): number => {
    pages = 0;
    const r = new MigrationStreamReader(sink, { maxRamBytes: 2 ** 42 });
    const start = process.hrtime.bigint();
    for (const c of input) r.push(c);
    r.end();
    const ns = Number(process.hrtime.bigint() - start);
    assert.equal(r.complete, true);
    assert.equal(pages, ramBytes / PAGE);
    return streamBytes / MiB / (ns / 1e9);
  };
  const report = (label: string, input: Buffer[]): string => {
    run(input); // warm-up
    const rates = [run(input), run(input), run(input)];
    return `${label}: median ${median(rates).toFixed(0)} MiB/s (runs ${rates.map((r) => r.toFixed(0)).join(', ')})`;
  };
  const lines = [
    `stream: ${(streamBytes / MiB).toFixed(0)} MiB, ${ramBytes / PAGE} PAGE records; writer ${(streamBytes / MiB / (writeNs / 1e9)).toFixed(0)} MiB/s`,
    report('reader, 1 MiB chunks (records aligned)', chunks),
    report('reader, 64 KiB chunks (records span chunks)', socketSized),
  ];
  assert.ok(check > 0);
  console.log(lines.join('\n'));
});
