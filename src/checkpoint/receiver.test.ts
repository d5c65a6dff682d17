/**
 * The receiver, page table and writer thread end to end, without QEMU: a golden stream (or a
 * synthetic one) is sent into the receiver's unix socket by a test client, persisted into a
 * staging directory, and the files are checked against what the stream holds, computed
 * independently with the reader: image bytes (the newest version of every page), the sums file
 * (SHA-256 per 1 MiB chunk, 32 zero bytes for an all-zero chunk), sparseness, config and device
 * state. A truncated stream must fail typed, never report completion, and leave nothing published.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { StreamError, TlcError } from '../core/errors.js';
import { CONFIG_FILE, DEVICE_FILE, MANIFEST_FILE, SUMS_CHUNK_BYTES, SUMS_MAGIC } from '../store/manifest.js';
import { verifyImage } from '../store/sums.js';
import { FIXTURES, loadFixture, type FixtureName } from '../stream/fixtures/index.js';
import { StreamModel, parseStream } from '../stream/fixtures/model.js';
import { MigrationStreamReader, type RamBlockInfo } from '../stream/reader.js';
import { MigrationStreamWriter } from '../stream/writer.js';
import { CheckpointReceiver, type ReceivedCheckpoint } from './receiver.js';

const PAGE = 4096;
const MiB = 1024 * 1024;
/** Guest RAM beyond 1 GiB: offsets past 32 bits of pages and past the old page table's segment. */
const SEGMENT_BYTES = 1024 * MiB;
const SUMS_HEADER_BYTES = 16;
const HASH_BYTES = 32;
/** Slack for file system metadata counted in st_blocks (ext4 extent tree blocks). */
const METADATA_SLACK_BYTES = 256 * 1024;

let base: string;
let serial = 0;

before(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-receiver-test-'));
});

after(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

/** A store-like directory holding one staging directory, and a socket path beside it. */
function workspace(): { store: string; staging: string; socket: string } {
  const store = path.join(base, `store-${serial}`);
  const staging = path.join(store, `.tmp-ckpt-${serial}`);
  fs.mkdirSync(staging, { recursive: true });
  return { store, staging, socket: path.join(base, `migrate-${serial++}.sock`) };
}

/** Sends `data` into the socket as a QEMU would (one connection, then EOF), in 64 KiB writes. */
function send(socketPath: string, data: Buffer): Promise<void> {
  return new Promise((resolve) => {
    const client = net.createConnection({ path: socketPath }, () => {
      for (let at = 0; at < data.length; at += 64 * 1024) client.write(data.subarray(at, at + 64 * 1024));
      client.end();
    });
    // The receiver hangs up on a stream it rejects; the test checks the receiver, not the sender.
    client.on('error', () => undefined);
    client.on('close', () => resolve());
  });
}

interface Run {
  staging: string;
  store: string;
  receiver: CheckpointReceiver;
  completions: number[];
}

/** Starts a receiver on a fresh staging directory and sends `data` into it. */
async function receive(data: Buffer): Promise<Run & { sent: Promise<void> }> {
  const { store, staging, socket } = workspace();
  const completions: number[] = [];
  const receiver = new CheckpointReceiver(staging, { onStreamComplete: (bytes) => completions.push(bytes) });
  await receiver.listen(socket);
  return { staging, store, receiver, completions, sent: send(socket, data) };
}

/** A model of the stream that also records which pages of each block were ever written non-zero. */
class ExpectedStream extends StreamModel {
  /** Per block: offsets a writer may have written (every PAGE/XBZRLE, every non-zero fill). */
  touched: Set<number>[] = [];
  override onBlockList(blocks: readonly RamBlockInfo[]): void {
    super.onBlockList(blocks);
    this.touched = blocks.map(() => new Set());
  }
  override onPage(block: number, offset: number, page: Buffer): void {
    super.onPage(block, offset, page);
    this.touched[block]?.add(offset);
  }
  override onZeroPage(block: number, offset: number, fill: number): void {
    super.onZeroPage(block, offset, fill);
    if (fill !== 0) this.touched[block]?.add(offset);
  }
  override onXbzrlePage(block: number, offset: number, delta: Buffer): void {
    super.onXbzrlePage(block, offset, delta);
    this.touched[block]?.add(offset);
  }
}

function expectedOf(data: Buffer): ExpectedStream {
  const model = new ExpectedStream();
  const reader = new MigrationStreamReader(model, { requireVmdesc: true });
  reader.push(data);
  reader.end();
  assert.equal(reader.complete, true);
  return model;
}

function sha256(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}

/**
 * Checks one block's image and sums file against the model, chunk by chunk (a 1 GiB image is
 * never held in memory): bytes, per-chunk hash, data pages. Returns the image's allocated bytes.
 */
function checkBlock(staging: string, got: ReceivedCheckpoint, model: ExpectedStream, i: number): number {
  const block = model.blocks[i] as RamBlockInfo;
  const entry = got.blocks[i];
  assert.ok(entry, `manifest entry for ${block.name}`);
  assert.equal(entry.name, block.name);
  assert.equal(entry.usedLength, block.usedLength);
  const imageFile = path.join(staging, entry.file);
  const sumsFile = path.join(staging, entry.sumsFile);
  const st = fs.statSync(imageFile);
  assert.equal(st.size, block.usedLength, `size of ${entry.file}`);

  const sums = fs.readFileSync(sumsFile);
  const count = Math.ceil(block.usedLength / SUMS_CHUNK_BYTES);
  assert.equal(sums.toString('latin1', 0, 8), SUMS_MAGIC);
  assert.equal(sums.readUInt32BE(8), SUMS_CHUNK_BYTES);
  assert.equal(sums.readUInt32BE(12), count);
  assert.equal(sums.length, SUMS_HEADER_BYTES + count * HASH_BYTES);
  assert.equal(entry.sumsSha256, sha256(sums).toString('hex'), 'sumsSha256 is the hash of the sums file');

  // The newest version of each page, grouped by sums chunk.
  const byChunk = new Map<number, [number, Buffer][]>();
  for (const [offset, page] of model.pages[i] ?? []) {
    const c = Math.floor(offset / SUMS_CHUNK_BYTES);
    byChunk.set(c, [...(byChunk.get(c) ?? []), [offset, page]]);
  }
  const expected = Buffer.alloc(SUMS_CHUNK_BYTES);
  const actual = Buffer.alloc(SUMS_CHUNK_BYTES);
  const zeroPage = Buffer.alloc(PAGE);
  let dataPages = 0;
  const fd = fs.openSync(imageFile, 'r');
  try {
    for (let c = 0; c < count; c++) {
      const at = c * SUMS_CHUNK_BYTES;
      const len = Math.min(SUMS_CHUNK_BYTES, block.usedLength - at);
      const want = expected.subarray(0, len).fill(0);
      for (const [offset, page] of byChunk.get(c) ?? []) page.copy(want, offset - at);
      let chunkDataPages = 0;
      for (const [, page] of byChunk.get(c) ?? []) if (!page.equals(zeroPage)) chunkDataPages++;
      dataPages += chunkDataPages;
      const have = actual.subarray(0, len);
      assert.equal(fs.readSync(fd, have, 0, len, at), len);
      if (!have.equals(want)) {
        for (let p = 0; p < len; p += PAGE) {
          const same = have.compare(want, p, p + PAGE, p, p + PAGE) === 0;
          assert.ok(same, `${block.name} page at 0x${(at + p).toString(16)} differs from the stream`);
        }
      }
      const hash = chunkDataPages === 0 ? Buffer.alloc(HASH_BYTES) : sha256(want);
      const stored = sums.subarray(
        SUMS_HEADER_BYTES + c * HASH_BYTES,
        SUMS_HEADER_BYTES + (c + 1) * HASH_BYTES,
      );
      assert.ok(stored.equals(hash), `${block.name} sums chunk ${c}`);
    }
  } finally {
    fs.closeSync(fd);
  }
  assert.equal(entry.dataPages, dataPages, `dataPages of ${block.name}`);
  // The store's own verifier agrees (skipped for the 1 GiB image: a second full read costs seconds).
  if (block.usedLength <= 64 * MiB) assert.deepEqual(verifyImage(imageFile, sumsFile, block.usedLength), []);
  return st.blocks * 512;
}

/** Receives `data` completely and checks every persisted file. */
async function receiveAndCheck(
  data: Buffer,
): Promise<{ model: ExpectedStream; got: ReceivedCheckpoint; allocated: number[] }> {
  const model = expectedOf(data);
  const run = await receive(data);
  await run.receiver.streamDone;
  await run.sent;
  assert.deepEqual(run.completions, [data.length], 'onStreamComplete once, with every byte');
  const got = await run.receiver.persist();
  const { staging } = run;

  assert.equal(got.machineType, model.machineType);
  assert.deepEqual(got.ramSection, model.ramHeader);
  assert.equal(got.bytesReceived, data.length);
  assert.equal(got.blocks.length, model.blocks.length);
  const allocated = model.blocks.map((_, i) => checkBlock(staging, got, model, i));

  const config = fs.readFileSync(path.join(staging, CONFIG_FILE));
  assert.ok(config.equals(model.configRaw), 'config.bin is the configuration section verbatim');
  assert.equal(got.configSha256, sha256(config).toString('hex'));
  const device = fs.readFileSync(path.join(staging, DEVICE_FILE));
  assert.ok(model.deviceBlob && device.equals(model.deviceBlob), 'device.bin is the device state verbatim');
  assert.deepEqual(got.device, {
    file: DEVICE_FILE,
    bytes: device.length,
    sha256: sha256(device).toString('hex'),
    sections: model.deviceInfo?.sections,
    ...(model.deviceInfo?.runstate ? { runstate: model.deviceInfo.runstate } : {}),
  });
  // Nothing beyond the files the manifest will name.
  const files = got.blocks
    .flatMap((b) => [b.file, b.sumsFile, b.hashesFile ?? ''])
    .concat(CONFIG_FILE, DEVICE_FILE);
  assert.deepEqual(fs.readdirSync(staging).sort(), files.sort());
  return { model, got, allocated };
}

describe('receiver end to end on the golden streams', { timeout: 120_000 }, () => {
  for (const name of Object.keys(FIXTURES) as FixtureName[]) {
    it(`${FIXTURES[name].file}: image bytes, sums, sparse ram0, config and device state`, async () => {
      const { model, allocated } = await receiveAndCheck(loadFixture(name));
      const ram = model.blockIndex('ram0');
      const ramBytes = (model.blocks[ram] as RamBlockInfo).usedLength;
      const written = (model.touched[ram]?.size ?? 0) * PAGE;
      // Sparse: only pages that were ever written hold blocks; the guest's zero pages are holes.
      assert.ok(
        (allocated[ram] as number) <= written + METADATA_SLACK_BYTES,
        `ram0 image allocates ${allocated[ram]} bytes for ${written} bytes of written pages`,
      );
      assert.ok((allocated[ram] as number) < ramBytes / 4, `ram0 image is sparse (${allocated[ram]} bytes)`);
    });
  }
});

describe('receiver end to end across a page-table segment boundary', { timeout: 120_000 }, () => {
  /**
   * ram0 a little over one segment (and not a whole number of MiB): a 10 MiB run of pages centred
   * on the boundary (longer than the writer's 4 MiB runs, so it is split both by length and at
   * the boundary), pages on either side re-sent and one turned zero, the block's first and last
   * page, and a small block in between so the stream switches blocks mid-run.
   */
  function segmentStream(): Buffer {
    const fixture = parseStream(loadFixture('precopyStopped'));
    const ramBytes = SEGMENT_BYTES + 8 * MiB + 2 * PAGE;
    const blocks: RamBlockInfo[] = [
      { name: 'ram0', usedLength: ramBytes },
      { name: 'pc.bios', usedLength: 256 * 1024 },
    ];
    const chunks: Buffer[] = [];
    const w = new MigrationStreamWriter((c) => void chunks.push(c));
    const page = (offset: number, version: number): Buffer => {
      const p = Buffer.alloc(PAGE, (offset / PAGE + version * 13) & 0xff);
      p.writeDoubleLE(offset, 0);
      p.writeUInt32LE(version, PAGE - 4);
      return p;
    };
    w.header(fixture.configRaw);
    w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, blocks, { ignoreShared: false });
    w.beginRamPart();
    w.page(0, 0, page(0, 1));
    for (let off = SEGMENT_BYTES - 5 * MiB; off < SEGMENT_BYTES + 5 * MiB; off += PAGE) {
      w.page(0, off, page(off, 1));
      if (off === SEGMENT_BYTES - PAGE) w.page(1, 0, page(0, 7)); // another block mid-run
    }
    w.page(0, ramBytes - PAGE, page(ramBytes - PAGE, 1));
    w.zeroPage(0, SEGMENT_BYTES + 6 * MiB); // a zero page that already reads zero
    w.endRamSection();
    w.beginRamPart();
    for (const off of [SEGMENT_BYTES - PAGE, SEGMENT_BYTES]) w.page(0, off, page(off, 2));
    w.zeroPage(0, SEGMENT_BYTES + PAGE); // data turned zero, just past the boundary
    w.zeroPage(0, SEGMENT_BYTES - 2 * PAGE); // and just before it
    w.endRamSection();
    w.beginRamEnd();
    w.page(0, SEGMENT_BYTES + 2 * PAGE, page(SEGMENT_BYTES + 2 * PAGE, 3));
    w.endRamSection();
    w.deviceState(fixture.deviceBlob as Buffer);
    void w.flush();
    return Buffer.concat(chunks);
  }

  it('writes the run on both sides of the boundary, newest version of each page, sparse elsewhere', async () => {
    const data = segmentStream();
    const { model, allocated } = await receiveAndCheck(data);
    const pages = model.pages[0] as Map<number, Buffer>;
    // The stream does cross the boundary: pages on both sides, one straddling pair re-sent.
    assert.equal(pages.get(SEGMENT_BYTES - PAGE)?.readUInt32LE(PAGE - 4), 2);
    assert.equal(pages.get(SEGMENT_BYTES)?.readUInt32LE(PAGE - 4), 2);
    assert.ok(pages.get(SEGMENT_BYTES + PAGE)?.equals(Buffer.alloc(PAGE)));
    const ramBytes = (model.blocks[0] as RamBlockInfo).usedLength;
    const written = (model.touched[0]?.size ?? 0) * PAGE;
    assert.ok(
      (allocated[0] as number) <= written + METADATA_SLACK_BYTES,
      `ram0 image allocates ${allocated[0]} bytes for ${written} bytes of written pages`,
    );
    assert.ok((allocated[0] as number) < ramBytes / 64);
  });
});

describe('receiver on a truncated stream', { timeout: 120_000 }, () => {
  const data = loadFixture('precopyRunning');
  const model = expectedOf(data);
  const deviceStart = data.length - (model.deviceBlob as Buffer).length;
  const cuts: [string, number][] = [
    ['inside the file header', 5],
    ['inside the RAM START section', 40],
    ['in the middle of the RAM sections', Math.floor(deviceStart / 2)],
    ['right before the device state', deviceStart],
    ['in the device state', deviceStart + 1000],
    ['one byte short of the end', data.length - 1],
  ];

  for (const [where, cut] of cuts) {
    it(`cut ${where} (${cut} of ${data.length} bytes): typed error, no completion, nothing published`, async () => {
      const run = await receive(data.subarray(0, cut));
      try {
        await assert.rejects(run.receiver.streamDone, (err: unknown) => {
          assert.ok(err instanceof TlcError, `typed error, got ${String(err)}`);
          assert.equal(err.code, 'E_STREAM');
          assert.match(err.message, /truncated|without a VM description/);
          assert.equal((err as StreamError).offset, cut, 'the error names where the stream ended');
          return true;
        });
        await run.sent;
        assert.deepEqual(run.completions, [], 'onStreamComplete (which resumes the VM) never fired');
        await assert.rejects(run.receiver.persist(), (err: unknown) => {
          assert.ok(err instanceof TlcError);
          assert.equal(err.code, 'E_CHECKPOINT');
          return true;
        });
      } finally {
        run.receiver.abort(new Error('test over'));
      }
      // At most the RAM image a writer thread had opened; no sums, config, device state or manifest.
      const left = fs.readdirSync(run.staging);
      for (const file of left) assert.match(file, /^block-\d+\.img$/, `staging holds ${file}`);
      for (const file of [CONFIG_FILE, DEVICE_FILE, MANIFEST_FILE]) assert.ok(!left.includes(file));
      // Nothing visible in the store: only the (hidden) staging directory.
      assert.deepEqual(fs.readdirSync(run.store), [path.basename(run.staging)]);
    });
  }

  it('a stream that is not a migration stream at all: typed error at offset 0', async () => {
    const run = await receive(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    try {
      await assert.rejects(run.receiver.streamDone, (err: unknown) => {
        assert.ok(err instanceof TlcError);
        assert.equal(err.code, 'E_STREAM');
        assert.match(err.message, /bad magic .* offset 0/);
        return true;
      });
      assert.deepEqual(run.completions, []);
    } finally {
      run.receiver.abort(new Error('test over'));
    }
    assert.deepEqual(fs.readdirSync(run.staging), []);
  });
});
