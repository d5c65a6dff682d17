/**
 * Migration stream reader throughput, without QEMU: a synthetic precopy stream of PAGE records
 * (1024 MiB of guest RAM by default) built with MigrationStreamWriter in 1 MiB chunks, then parsed
 * fed as those chunks (records aligned) and as 64 KiB socket-sized pieces (records span chunks),
 * side by side in one run. One warm-up, then `--repeats` timed runs of each; median and spread.
 *
 *   npm run bench:reader [-- --mib 256 --repeats 3]
 *
 * Prints a table (stderr) and the results (stdout), and writes
 * bench/out/reader-throughput-<timestamp>.json stamped with the revision and the machine.
 */
import { loadFixture } from '../stream/fixtures/index.js';
import { parseStream } from '../stream/fixtures/model.js';
import { MigrationStreamReader, type StreamSink } from '../stream/reader.js';
import { MigrationStreamWriter } from '../stream/writer.js';
import { summarize, type Summary } from './stats.js';
import { machineStamp, saveResult } from './workspace.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const SOCKET_CHUNK = 64 * 1024;

function flag(name: string, fallback: number): number {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0) return fallback;
  const v = Number(process.argv[at + 1]);
  if (!Number.isInteger(v) || v <= 0) throw new Error(`--${name} needs a positive integer`);
  return v;
}

const RAM_MIB = flag('mib', 1024);
const REPEATS = flag('repeats', 5);
const ramBytes = RAM_MIB * MiB;
const fixture = parseStream(loadFixture('precopyStopped'));

/** Writes the stream (one PART per MiB of RAM, pages stamped with their offset); returns its chunks. */
function writeStream(): Buffer[] {
  const chunks: Buffer[] = [];
  const w = new MigrationStreamWriter((c) => void chunks.push(c));
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
  return chunks;
}

let pages = 0;
let touched = 0;
const sink: StreamSink = {
  onConfiguration() {},
  onRamStart() {},
  onBlockList() {},
  onPage(_block, _offset, page) {
    pages++;
    touched += page[PAGE - 1] as number; // keeps the view from being optimized away
  },
  onZeroPage() {},
  onXbzrlePage() {},
  onRamSectionEnd() {},
  onDeviceState() {},
};

/** One parse of the whole stream; returns MiB/s of stream. */
function parse(input: Buffer[], streamBytes: number): number {
  pages = 0;
  const reader = new MigrationStreamReader(sink, { maxRamBytes: 2 ** 42 });
  const started = process.hrtime.bigint();
  for (const c of input) reader.push(c);
  reader.end();
  const ns = Number(process.hrtime.bigint() - started);
  if (!reader.complete || pages !== ramBytes / PAGE) {
    throw new Error(`parsed ${pages} pages of ${ramBytes / PAGE}; complete=${reader.complete}`);
  }
  return streamBytes / MiB / (ns / 1e9);
}

/** A warm-up run, then REPEATS timed runs. */
function measure(run: () => number): { mibPerSec: Summary; runs: number[] } {
  run();
  const runs = Array.from({ length: REPEATS }, run);
  return { mibPerSec: summarize(runs) as Summary, runs };
}

function main(): void {
  let chunks: Buffer[] = [];
  const writer = measure(() => {
    const started = process.hrtime.bigint();
    chunks = writeStream();
    const ns = Number(process.hrtime.bigint() - started);
    return chunks.reduce((n, c) => n + c.length, 0) / MiB / (ns / 1e9);
  });
  const streamBytes = chunks.reduce((n, c) => n + c.length, 0);
  const socketSized: Buffer[] = [];
  for (const c of chunks) {
    for (let i = 0; i < c.length; i += SOCKET_CHUNK) socketSized.push(c.subarray(i, i + SOCKET_CHUNK));
  }
  const results = {
    writer,
    readerAlignedChunks: { chunkBytes: MiB, ...measure(() => parse(chunks, streamBytes)) },
    readerSocketChunks: { chunkBytes: SOCKET_CHUNK, ...measure(() => parse(socketSized, streamBytes)) },
  };
  if (touched === 0) throw new Error('no page was read');

  const row = (label: string, s: Summary): string =>
    `${label.padEnd(44)} ${s.median.toFixed(0).padStart(6)} MiB/s  (min ${s.min.toFixed(0)}, max ${s.max.toFixed(0)}, n ${s.n})`;
  process.stderr.write(
    [
      `stream: ${(streamBytes / MiB).toFixed(0)} MiB, ${ramBytes / PAGE} PAGE records, ${REPEATS} runs after a warm-up`,
      row('writer, 1 MiB chunks', results.writer.mibPerSec),
      row('reader, 1 MiB chunks (records aligned)', results.readerAlignedChunks.mibPerSec),
      row('reader, 64 KiB chunks (records span chunks)', results.readerSocketChunks.mibPerSec),
    ].join('\n') + '\n',
  );
  const stamp = { ...machineStamp(), repeats: REPEATS, warmUps: 1 };
  const out = {
    stamp,
    stream: { ramMiB: RAM_MIB, streamBytes, pageRecords: ramBytes / PAGE },
    results,
  };
  const file = saveResult('reader-throughput', stamp.date, 'json', JSON.stringify(out, null, 2) + '\n');
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
  process.stderr.write(`saved ${file}\n`);
}

main();
