import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { StreamError } from '../core/errors.js';
import { QEMU } from './constants.js';
import { FIXTURES, loadFixture, type FixtureName } from './fixtures/index.js';
import { assertSamePages, parseStream, writeModelToBuffer, writeModel } from './fixtures/model.js';
import { MigrationStreamWriter } from './writer.js';

const PAGE = 4096;
const MiB = 1024 * 1024;

describe('MigrationStreamWriter round trip', () => {
  for (const name of Object.keys(FIXTURES) as FixtureName[]) {
    it(`re-synthesizes ${FIXTURES[name].file} with the same pages, blocks and device state`, async () => {
      const original = parseStream(loadFixture(name));
      const written = await writeModelToBuffer(original, { recordsPerSection: 1000 });
      const again = parseStream(written, 100_003);
      assert.ok(again.configRaw.equals(original.configRaw));
      assert.deepEqual(again.ramHeader, original.ramHeader);
      assert.deepEqual(again.blocks, original.blocks);
      assertSamePages(again, original);
      assert.ok(again.deviceBlob?.equals(original.deviceBlob as Buffer));
      assert.deepEqual(again.deviceInfo, original.deviceInfo);
      const parts = again.sections.filter((s) => s.kind === 'part').length;
      const records = original.pages.reduce((n, m) => n + m.size, 0);
      assert.equal(parts, Math.ceil(records / 1000));
      assert.deepEqual(again.sections.at(-1), { kind: 'end', bytes: 5 + 8 + 5 });
    });
  }

  it('omits blocks and zero pages on request', async () => {
    const original = parseStream(loadFixture('precopyStopped'));
    const lazy = parseStream(
      await writeModelToBuffer(original, { omitBlocks: ['ram0'], dropZeroPages: true }),
    );
    assert.equal(lazy.pages[0]?.size, 0);
    assert.equal(lazy.counts.zero, 0);
    assert.ok(lazy.counts.page > 0);
    for (const b of original.blocks.slice(1))
      assert.ok(lazy.image(b.name).equals(original.image(b.name)), b.name);
  });
});

describe('MigrationStreamWriter records', () => {
  const config = parseStream(loadFixture('precopyStopped'));

  it('names the block in the first record of each section and on block change, CONTINUE otherwise', async () => {
    const chunks: Buffer[] = [];
    const w = new MigrationStreamWriter((c) => void chunks.push(c));
    w.header(config.configRaw);
    w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, config.blocks, { ignoreShared: false });
    const at: number[] = [];
    const bios = config.blockIndex('pc.bios');
    w.beginRamPart();
    for (const [b, off] of [
      [0, 0],
      [0, PAGE],
      [bios, 0],
      [0, 2 * PAGE],
    ] as const) {
      at.push(w.offset);
      w.zeroPage(b, off);
    }
    w.endRamSection();
    w.beginRamPart();
    at.push(w.offset);
    w.page(0, 3 * PAGE, Buffer.alloc(PAGE, 3));
    w.endRamSection();
    w.ramEnd();
    w.deviceState(config.deviceBlob as Buffer);
    await w.flush();
    const data = Buffer.concat(chunks);
    const named = at.map((o) => (data.readUInt32BE(o + 4) & QEMU.RAM_SAVE_FLAG_CONTINUE) === 0);
    assert.deepEqual(named, [true, false, true, true, true]);
    assert.equal(data.readUInt32BE(at[1] as number), 0);
    assert.equal(
      data.readUInt32BE((at[1] as number) + 4),
      PAGE | QEMU.RAM_SAVE_FLAG_ZERO | QEMU.RAM_SAVE_FLAG_CONTINUE,
    );
    assert.equal(data.toString('latin1', (at[0] as number) + 9, (at[0] as number) + 13), 'ram0');
    const m = parseStream(data);
    assert.equal(m.counts.zero, 4);
    assert.ok(m.pages[0]?.get(3 * PAGE)?.equals(Buffer.alloc(PAGE, 3)));
    assert.deepEqual(
      m.sections.map((s) => s.kind),
      ['start', 'part', 'part', 'end'],
    );
    assert.equal(w.offset, data.length);
  });

  it('rejects misuse with StreamErrors', () => {
    const w = new MigrationStreamWriter(() => undefined);
    assert.throws(
      () => w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, config.blocks, { ignoreShared: false }),
      /ramStart\(\) called before header/,
    );
    assert.throws(() => w.header(Buffer.from([1, 2, 3])), StreamError);
    w.header(config.configRaw);
    assert.throws(() => w.header(config.configRaw), /header\(\) called after header/);
    assert.throws(
      () => w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, config.blocks, { ignoreShared: true }),
      /does not enable x-ignore-shared/,
    );
    w.ramStart({ sectionId: 2, instanceId: 0, versionId: 4 }, config.blocks, { ignoreShared: false });
    assert.throws(
      () => w.page(0, 0, Buffer.alloc(PAGE)),
      /page\(\)\/zeroPage\(\) called between RAM sections/,
    );
    w.beginRamPart();
    assert.throws(() => w.page(0, 0, Buffer.alloc(100)), /page of 100 bytes/);
    assert.throws(() => w.zeroPage(0, 100), /page offset 100 invalid/);
    assert.throws(() => w.zeroPage(0, 32 * MiB), /page offset 33554432 invalid/);
    assert.throws(() => w.zeroPage(99, 0), /no RAM block #99/);
    assert.throws(() => w.deviceState(Buffer.from([4])), /deviceState\(\) called inside a RAM section/);
    w.endRamSection();
    assert.throws(() => w.deviceState(Buffer.from([1])), /must start with a FULL section or EOF/);
    w.ramEnd();
    assert.throws(() => w.beginRamPart(), /after the END section/);
  });
});

describe('MigrationStreamWriter output', () => {
  const model = parseStream(loadFixture('precopyRunning'));

  it('batches records into chunks of chunkSize', async () => {
    const sizes: number[] = [];
    await writeModel(model, (c) => void sizes.push(c.length), { writer: { chunkSize: 256 * 1024 } });
    const blob = (model.deviceBlob as Buffer).length;
    const ramChunks = sizes.slice(0, sizes.indexOf(blob) >= 0 ? sizes.indexOf(blob) : sizes.length - 1);
    assert.ok(ramChunks.length >= 2, `${sizes.length} chunks`);
    for (const s of ramChunks.slice(0, -1))
      assert.ok(s <= 256 * 1024 && s > 256 * 1024 - PAGE - 300, `chunk of ${s}`);
  });

  it('applies back-pressure: one out() call at a time, bounded backlog, same bytes', async () => {
    const reference = await writeModelToBuffer(model);
    const chunkSize = 16 * 1024;
    const highWaterMark = 48 * 1024;
    const got: Buffer[] = [];
    let active = 0;
    let maxActive = 0;
    let falses = 0;
    let maxPending = 0;
    const out = async (c: Buffer): Promise<void> => {
      active++;
      maxActive = Math.max(maxActive, active);
      await tick();
      got.push(Buffer.from(c));
      active--;
    };
    const w = new MigrationStreamWriter(out, { chunkSize, highWaterMark });
    w.header(model.configRaw);
    w.ramStart(model.ramHeader ?? { sectionId: 2, instanceId: 0, versionId: 4 }, model.blocks, {
      ignoreShared: false,
    });
    w.beginRamPart();
    let written = 0;
    for (const [i] of model.blocks.entries()) {
      for (const [off, page] of [...(model.pages[i] ?? [])].sort((a, b) => a[0] - b[0])) {
        const zero = !page.some((b) => b !== 0);
        const more = zero ? w.zeroPage(i, off) : w.page(i, off, page);
        written++;
        maxPending = Math.max(maxPending, w.offset - got.reduce((n, c) => n + c.length, 0));
        if (!more) {
          falses++;
          await w.drain();
        }
      }
    }
    w.endRamSection();
    w.ramEnd();
    w.deviceState(model.deviceBlob as Buffer);
    await w.flush();
    assert.equal(maxActive, 1);
    assert.ok(falses > 5, `write returned false ${falses} times for ${written} records`);
    assert.ok(maxPending <= highWaterMark + 2 * chunkSize, `max pending ${maxPending}`);
    assert.ok(Buffer.concat(got).equals(reference));
  });

  it('surfaces a failing out() from drain(), flush() and later writes', async () => {
    let calls = 0;
    const boom = new Error('disk full');
    const w = new MigrationStreamWriter(
      async () => {
        calls++;
        await tick();
        if (calls === 2) throw boom;
      },
      { chunkSize: 16 * 1024, highWaterMark: 16 * 1024 },
    );
    w.header(model.configRaw);
    w.ramStart(model.ramHeader ?? { sectionId: 2, instanceId: 0, versionId: 4 }, model.blocks, {
      ignoreShared: false,
    });
    w.beginRamPart();
    let thrown: unknown = null;
    try {
      for (let off = 0; off < 32 * MiB; off += PAGE) {
        if (!w.page(0, off, Buffer.alloc(PAGE, 1))) await w.drain();
      }
    } catch (err) {
      thrown = err;
    }
    assert.equal(thrown, boom);
    await assert.rejects(w.flush(), /disk full/);
    await assert.rejects(w.drain(), /disk full/);
    assert.throws(() => w.zeroPage(0, 0), /disk full/);
    assert.equal(calls, 2);
  });
});
