/**
 * A large synthetic stream parses to the right pages however it is cut: ~17 MiB of PAGE and ZERO
 * records over two blocks, the block changing mid-section, pages re-sent (the newest wins, a data
 * page can turn zero), pushed in chunks of odd sizes so records and their headers span chunks at
 * every position. No timing here: throughput is measured by `src/bench/reader-throughput.ts`.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadFixture } from './fixtures/index.js';
import { parseStream, rng } from './fixtures/model.js';
import { MigrationStreamReader, applyXbzrle, type RamBlockInfo, type StreamSink } from './reader.js';
import { MigrationStreamWriter } from './writer.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const BLOCKS: RamBlockInfo[] = [
  { name: 'ram0', usedLength: 16 * MiB },
  { name: 'pc.rom', usedLength: 128 * 1024 },
];

/** Version `v` of the page at `offset` of `block`: distinct from every other page and version. */
function pageContent(block: number, offset: number, v: number): Buffer {
  const page = Buffer.alloc(PAGE, (block * 37 + offset / PAGE + v * 11) & 0xff);
  page.writeUInt32LE(offset, 0);
  page.writeUInt32LE(block * 1000 + v, 4);
  page.writeUInt32LE((offset ^ 0xa5a5a5a5) >>> 0, PAGE - 4);
  return page;
}

interface Expected {
  data: Buffer;
  images: Buffer[];
  records: { page: number; zero: number };
  device: Buffer;
}

/**
 * Pass 1: every page of both blocks (ram0 every 5th page ZERO), pc.rom interleaved so the block
 * changes mid-section; sections of 1000 records. Pass 2: every 3rd ram0 page again, every 4th of
 * those as ZERO (a data page turning zero). END: the last 16 pages once more.
 */
function buildStream(): Expected {
  const fixture = parseStream(loadFixture('precopyStopped'));
  const chunks: Buffer[] = [];
  const w = new MigrationStreamWriter((c) => void chunks.push(c));
  const images = BLOCKS.map((b) => Buffer.alloc(b.usedLength));
  const records = { page: 0, zero: 0 };
  let inSection = 0;
  const put = (block: number, offset: number, v: number, zero: boolean): void => {
    if (inSection === 1000) {
      w.endRamSection();
      w.beginRamPart();
      inSection = 0;
    }
    inSection++;
    const image = images[block] as Buffer;
    if (zero) {
      w.zeroPage(block, offset);
      image.fill(0, offset, offset + PAGE);
      records.zero++;
    } else {
      const page = pageContent(block, offset, v);
      w.page(block, offset, page);
      page.copy(image, offset);
      records.page++;
    }
  };
  w.header(fixture.configRaw);
  w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, BLOCKS, { ignoreShared: false });
  const ramPages = (BLOCKS[0] as RamBlockInfo).usedLength / PAGE;
  const romPages = (BLOCKS[1] as RamBlockInfo).usedLength / PAGE;
  w.beginRamPart();
  for (let p = 0; p < ramPages; p++) {
    put(0, p * PAGE, 1, p % 5 === 0);
    if (p % 128 === 0 && p / 128 < romPages) put(1, (p / 128) * PAGE, 1, false);
  }
  for (let p = 0; p < ramPages; p += 3) put(0, p * PAGE, 2, p % 12 === 0);
  w.endRamSection();
  w.beginRamEnd();
  inSection = 0;
  for (let p = ramPages - 16; p < ramPages; p++) put(0, p * PAGE, 3, false);
  w.endRamSection();
  const device = fixture.deviceBlob as Buffer;
  w.deviceState(device);
  void w.flush();
  return { data: Buffer.concat(chunks), images, records, device };
}

/** A sink that keeps an image per block, like the receiver does. */
class ImageSink implements StreamSink {
  images: Buffer[] = [];
  records = { page: 0, zero: 0 };
  device: Buffer | undefined;
  onConfiguration(): void {}
  onRamStart(): void {}
  onBlockList(blocks: readonly RamBlockInfo[]): void {
    this.images = blocks.map((b) => Buffer.alloc(b.usedLength));
  }
  onPage(block: number, offset: number, page: Buffer): void {
    assert.equal(page.length, PAGE);
    page.copy(this.images[block] as Buffer, offset);
    this.records.page++;
  }
  onZeroPage(block: number, offset: number, fill: number): void {
    (this.images[block] as Buffer).fill(fill, offset, offset + PAGE);
    this.records.zero++;
  }
  onXbzrlePage(block: number, offset: number, delta: Buffer): void {
    applyXbzrle((this.images[block] as Buffer).subarray(offset, offset + PAGE), delta, 0);
  }
  onRamSectionEnd(): void {}
  onDeviceState(blob: Buffer): void {
    this.device = Buffer.from(blob);
  }
}

/** Pushes `data` cut at `sizes()`; chunks are views, queued by the reader as given (no copy). */
function parseInChunks(data: Buffer, sizes: () => number): ImageSink {
  const sink = new ImageSink();
  const reader = new MigrationStreamReader(sink);
  for (let at = 0; at < data.length;) {
    const n = Math.max(1, Math.min(sizes(), data.length - at));
    reader.push(data.subarray(at, at + n));
    at += n;
  }
  reader.end();
  assert.equal(reader.complete, true);
  assert.equal(reader.offset, data.length);
  return sink;
}

describe('a large stream in chunks of odd sizes', () => {
  const expected = buildStream();

  const check = (sink: ImageSink): void => {
    assert.deepEqual(sink.records, expected.records);
    for (const [i, b] of BLOCKS.entries()) {
      const image = sink.images[i] as Buffer;
      const want = expected.images[i] as Buffer;
      if (image.equals(want)) continue;
      for (let off = 0; off < b.usedLength; off += PAGE) {
        const same = image.compare(want, off, off + PAGE, off, off + PAGE) === 0;
        assert.ok(same, `${b.name} page 0x${off.toString(16)} differs`);
      }
    }
    assert.ok(sink.device?.equals(expected.device), 'device state');
  };

  it('the stream is what it should be: large, mostly PAGE records, pages re-sent', () => {
    assert.ok(expected.data.length > 16 * MiB, `${expected.data.length} bytes`);
    assert.ok(expected.records.page > 4096 && expected.records.zero > 1000);
  });

  for (const size of [1_048_576, 1_000_003, 65_537, 4097, 4095, 509, 7]) {
    it(`chunks of ${size} bytes`, () => check(parseInChunks(expected.data, () => size)));
  }

  it('chunks of random sizes 1 .. 12000 bytes', () => {
    const r = rng(8);
    check(parseInChunks(expected.data, () => 1 + Math.floor(r() * 12_000)));
  });

  it('mostly tiny chunks with the occasional large one', () => {
    const r = rng(9);
    check(parseInChunks(expected.data, () => (r() < 0.01 ? 300_000 : 1 + Math.floor(r() * 24))));
  });
});
