import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { deflateSync } from 'node:zlib';
import { StreamError } from '../core/errors.js';
import { QEMU } from './constants.js';
import { FIXTURES, loadFixture, loadManifest, type FixtureName } from './fixtures/index.js';
import { StreamModel, assertSamePages, parseStream, rng } from './fixtures/model.js';
import {
  MigrationStreamReader,
  applyXbzrle,
  parseConfiguration,
  type ReaderOptions,
  type StreamSink,
} from './reader.js';
import { MigrationStreamWriter } from './writer.js';

const MiB = 1024 * 1024;
const PAGE = 4096;

const nullSink: StreamSink = {
  onConfiguration() {},
  onRamStart() {},
  onBlockList() {},
  onPage() {},
  onZeroPage() {},
  onXbzrlePage() {},
  onRamSectionEnd() {},
  onDeviceState() {},
};

/** Parse `data` and return the StreamError it raises (from push or end); fails if it parses. */
function parseError(data: Buffer, opts?: ReaderOptions, sink: StreamSink = nullSink): StreamError {
  const r = new MigrationStreamReader(sink, opts);
  try {
    r.push(data);
    r.end();
  } catch (err) {
    assert.ok(err instanceof StreamError, `expected a StreamError, got ${String(err)}`);
    assert.equal(r.complete, false);
    return err;
  }
  assert.fail('stream parsed without error');
}

function expectError(data: Buffer, message: RegExp, offset?: number, opts?: ReaderOptions): StreamError {
  const err = parseError(data, opts);
  assert.match(err.message, message);
  assert.equal(err.code, 'E_STREAM');
  if (offset !== undefined) assert.equal(err.offset, offset, `offset of: ${err.message}`);
  return err;
}

// ---- golden streams from QEMU 7.2 ------------------------------------------------------------------

describe('QEMU 7.2 fixtures', () => {
  const manifest = loadManifest();
  for (const name of Object.keys(FIXTURES) as FixtureName[]) {
    const spec = FIXTURES[name];
    it(`parses ${spec.file} (${spec.description})`, () => {
      const data = loadFixture(name);
      const m = parseStream(data);
      const qemu = manifest[spec.file];
      assert.ok(qemu !== undefined, 'manifest entry');
      assert.equal(data.length, qemu.bytes);

      assert.equal(m.machineType, 'pc-i440fx-7.2');
      assert.deepEqual(m.ramHeader, { sectionId: m.ramHeader?.sectionId, instanceId: 0, versionId: 4 });
      assert.deepEqual(m.blocks[0], {
        name: 'ram0',
        usedLength: 32 * MiB,
        ...(spec.sharedRam ? { mrAddr: 0 } : {}),
      });
      const names = m.blocks.map((b) => b.name);
      assert.ok(names.includes('pc.bios') && names.includes('pc.rom'), names.join(','));
      assert.equal(m.blocks.find((b) => b.name === 'pc.bios')?.usedLength, 256 * 1024);

      // Page counts agree with QEMU's own counters (query-migrate ram.normal / ram.duplicate).
      assert.equal(m.counts.page, qemu.normal, 'PAGE records');
      assert.equal(m.counts.zero, qemu.duplicate, 'ZERO records');
      // Every page of every migrated block was sent at least once (ignored shared blocks: never).
      for (const [i, b] of m.blocks.entries()) {
        const expected = spec.sharedRam && b.name === 'ram0' ? 0 : b.usedLength / PAGE;
        assert.equal(m.pages[i]?.size, expected, `pages of ${b.name}`);
      }

      // Section structure.
      const kinds = m.sections.map((s) => s.kind);
      assert.equal(kinds[0], 'start');
      assert.ok(kinds.slice(1, -1).every((k) => k === 'part'));
      if (name === 'backgroundSnapshot') {
        assert.ok(!kinds.includes('end'), 'background snapshot has no RAM END');
        assert.ok(kinds.length >= 2);
        // Every page exactly once.
        const pages = m.blocks.reduce((n, b) => n + b.usedLength / PAGE, 0);
        assert.equal(m.counts.page + m.counts.zero + m.counts.xbzrle, pages);
      } else {
        assert.equal(kinds.at(-1), 'end');
      }
      assert.deepEqual(m.commands, [], 'exec: streams carry no commands');

      // Device state: verified with the VMDESC JSON.
      assert.ok(m.deviceBlob !== null && m.deviceInfo !== null);
      assert.equal(m.deviceBlob[0], QEMU.QEMU_VM_SECTION_FULL);
      assert.equal(m.deviceInfo.verified, true);
      assert.equal(m.deviceInfo.sections, 30);
      assert.ok(m.deviceInfo.vmdescJsonBytes > 50_000);
      assert.equal(m.deviceInfo.runstate, spec.stopped ? 'paused' : 'running');

      const config = parseConfiguration(m.configRaw);
      if (spec.sharedRam) {
        assert.deepEqual(config.capabilities, ['x-ignore-shared']);
        assert.ok(m.blocks.every((b) => typeof b.mrAddr === 'number'));
        assert.equal(m.blocks.find((b) => b.name === 'pc.bios')?.mrAddr, 0xfffc0000);
      } else {
        assert.deepEqual(config.capabilities, []);
        assert.equal(m.configRaw.length, 1 + 4 + 'pc-i440fx-7.2'.length);
        assert.ok(m.blocks.every((b) => b.mrAddr === undefined));
      }
      if (qemu.xbzrleBytes !== undefined) {
        assert.ok(m.counts.xbzrle >= 1, 'XBZRLE records');
        // QEMU counts each record minus its 8-byte header word: [name] + encoding header + delta.
        const min = m.counts.xbzrle * 3 + m.counts.xbzrleBytes;
        assert.ok(qemu.xbzrleBytes >= min && qemu.xbzrleBytes <= min + 256 * m.counts.xbzrle);
      } else {
        assert.equal(m.counts.xbzrle, 0);
      }
    });
  }

  it('keeps the CONTINUE block across section boundaries (precopy-running)', () => {
    const data = loadFixture('precopyRunning');
    const ends: number[] = [];
    const model = new StreamModel();
    const sink: StreamSink = Object.assign(Object.create(model) as StreamModel, {
      onRamSectionEnd: (kind: 'start' | 'part' | 'end', bytes: number) => {
        model.onRamSectionEnd(kind, bytes);
        ends.push(reader.offset);
      },
    });
    const reader = new MigrationStreamReader(sink);
    reader.push(data);
    reader.end();
    // Sections whose first record is a CONTINUE page record: the block was named in an earlier section.
    let continued = 0;
    for (const e of ends) {
      if (data[e] !== QEMU.QEMU_VM_SECTION_PART && data[e] !== QEMU.QEMU_VM_SECTION_END) continue;
      const flags = data.readUInt32BE(e + 5 + 4) & (PAGE - 1);
      if (flags !== QEMU.RAM_SAVE_FLAG_EOS && flags & QEMU.RAM_SAVE_FLAG_CONTINUE) continued++;
    }
    assert.ok(continued >= 1, `sections starting with CONTINUE: ${continued}`);
    assert.ok(model.sections.filter((s) => s.kind === 'part').length >= 3);
  });

  it('gives the same result for any chunking', () => {
    const r = rng(1);
    for (const name of Object.keys(FIXTURES) as FixtureName[]) {
      const data = loadFixture(name);
      const whole = parseStream(data, data.length);
      for (const size of [7, 4095, 4097, 65536 + 3]) {
        const m = parseStream(data, size);
        assertSamePages(m, whole);
        assert.deepEqual(m.counts, whole.counts);
        assert.deepEqual(m.sections, whole.sections);
        assert.ok(m.deviceBlob?.equals(whole.deviceBlob as Buffer));
        assert.ok(m.configRaw.equals(whole.configRaw));
      }
      // Random chunk sizes, 1 .. 10000 bytes.
      const m = new StreamModel();
      const reader = new MigrationStreamReader(m);
      for (let i = 0; i < data.length;) {
        const n = 1 + Math.floor(r() * 10000);
        reader.push(data.subarray(i, i + n));
        i += n;
      }
      reader.end();
      assertSamePages(m, whole);
      assert.ok(m.deviceBlob?.equals(whole.deviceBlob as Buffer));
    }
    // One byte at a time.
    const data = loadFixture('precopyStopped');
    const one = parseStream(data, 1);
    assertSamePages(one, parseStream(data));
  });
});

// ---- hostile input: specific cases ---------------------------------------------------------------

interface Synthetic {
  data: Buffer;
  model: StreamModel;
  /** Stream offsets of the records, by name. */
  at: Record<
    'start' | 'memSize' | 'startFooter' | 'part' | 'page' | 'contPage' | 'zero' | 'eos' | 'end' | 'device',
    number
  >;
}

/** A small stream from the stopped fixture's configuration, blocks and device state. */
function synthetic(): Synthetic {
  const model = parseStream(loadFixture('precopyStopped'));
  const chunks: Buffer[] = [];
  const w = new MigrationStreamWriter((c) => void chunks.push(c));
  const at = {} as Synthetic['at'];
  w.header(model.configRaw);
  at.start = w.offset;
  at.memSize = at.start + 1 + 4 + 1 + 3 + 8;
  w.ramStart(model.ramHeader ?? { sectionId: 2, instanceId: 0, versionId: 4 }, model.blocks, {
    ignoreShared: false,
  });
  at.startFooter = w.offset - 5;
  at.part = w.offset;
  w.beginRamPart();
  at.page = w.offset;
  w.page(0, 0, Buffer.alloc(PAGE, 0xaa));
  at.contPage = w.offset;
  w.page(0, PAGE, Buffer.alloc(PAGE, 0xbb));
  at.zero = w.offset;
  w.zeroPage(model.blockIndex('pc.bios'), 0);
  at.eos = w.offset;
  w.endRamSection();
  at.end = w.offset;
  w.ramEnd();
  at.device = w.offset;
  w.deviceState(model.deviceBlob ?? Buffer.alloc(0));
  void w.flush();
  return { data: Buffer.concat(chunks), model, at };
}

function patched(data: Buffer, f: (d: Buffer) => void): Buffer {
  const d = Buffer.from(data);
  f(d);
  return d;
}

function spliced(data: Buffer, at: number, insert: Buffer, remove = 0): Buffer {
  return Buffer.concat([data.subarray(0, at), insert, data.subarray(at + remove)]);
}

function command(cmd: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(5);
  b[0] = QEMU.QEMU_VM_COMMAND;
  b.writeUInt16BE(cmd, 1);
  b.writeUInt16BE(payload.length, 3);
  return Buffer.concat([b, payload]);
}

function be64(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

describe('hostile input', () => {
  const s = synthetic();
  const { data, at } = s;
  const pageWordLo = at.page + 4;

  it('parses the synthetic stream itself', () => {
    const m = parseStream(data);
    assert.equal(m.counts.page, 2);
    assert.equal(m.counts.zero, 1);
    assert.ok(m.pages[0]?.get(PAGE)?.equals(Buffer.alloc(PAGE, 0xbb)));
    assert.equal(m.deviceInfo?.verified, true);
  });

  it('rejects a bad magic and other versions', () => {
    expectError(
      patched(data, (d) => (d[0] = 0x51 ^ 0xff)),
      /bad magic/,
      0,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(2, 4)),
      /version 2 is obsolete/,
      4,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(4, 4)),
      /unsupported stream version 4/,
      4,
    );
  });

  it('rejects a missing configuration and a too long machine type name', () => {
    expectError(
      patched(data, (d) => (d[8] = QEMU.QEMU_VM_SECTION_START)),
      /configuration section/,
      8,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(256, 9)),
      /machine type name length 256/,
      9,
    );
    const sub = Buffer.concat([
      Buffer.from([QEMU.QEMU_VM_SUBSECTION, 17]),
      Buffer.from('configuration/xyz'),
      Buffer.from([0, 0, 0, 1]),
    ]);
    expectError(
      spliced(data, at.start, sub),
      /unknown configuration subsection "configuration\/xyz"/,
      at.start,
    );
    const caps = Buffer.concat([
      Buffer.from([QEMU.QEMU_VM_SUBSECTION, 26]),
      Buffer.from('configuration/capabilities'),
      Buffer.from([0, 0, 0, 1, 0, 0, 0, 1, 3]),
      Buffer.from('foo'),
    ]);
    expectError(spliced(data, at.start, caps), /unknown validated capability "foo"/);
  });

  it('rejects unknown and misplaced section types', () => {
    expectError(spliced(data, at.part, Buffer.from([0x09])), /unknown section type 0x9/, at.part);
    expectError(
      spliced(data, at.part, Buffer.from([QEMU.QEMU_VM_SUBSECTION])),
      /not allowed at top level/,
      at.part,
    );
    expectError(
      spliced(data, at.part, Buffer.from([QEMU.QEMU_VM_SECTION_FOOTER])),
      /not allowed at top level/,
      at.part,
    );
  });

  it('rejects bad section footers and foreign section ids', () => {
    expectError(
      patched(data, (d) => d.writeUInt32BE(3, at.startFooter + 1)),
      /footer for id 3/,
      at.startFooter,
    );
    expectError(
      patched(data, (d) => (d[at.startFooter] = 0x7f)),
      /expected a section footer/,
      at.startFooter,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(9, at.part + 1)),
      /PART for id 9/,
      at.part,
    );
    const second = data.subarray(at.start, at.part);
    expectError(spliced(data, at.part, second), /second RAM START/, at.part);
  });

  it('rejects unsupported iterable sections and RAM versions', () => {
    const block = Buffer.concat([Buffer.from([1, 0, 0, 0, 7, 5]), Buffer.from('block'), Buffer.alloc(8)]);
    expectError(spliced(data, at.start, block), /iterable section "block" is not supported/, at.start);
    expectError(
      patched(data, (d) => d.writeUInt32BE(3, at.memSize - 4)),
      /RAM section version 3/,
    );
  });

  it('bounds the MEM_SIZE total and checks the block list against it', () => {
    expectError(data, /MEM_SIZE total \d+ exceeds the limit of 16777216/, at.memSize, {
      maxRamBytes: 16 * MiB,
    });
    const setTotal = (total: number): Buffer =>
      patched(data, (d) => d.writeUInt32BE(total + QEMU.RAM_SAVE_FLAG_MEM_SIZE, at.memSize + 4));
    // ram0 fits, then the 128 KiB ACPI table block does not fit the remaining 64 KiB.
    expectError(
      setTotal(32 * MiB + 64 * 1024),
      /disagrees with the MEM_SIZE total \(block of 131072 bytes\)/,
      at.memSize + 8 + 5 + 8,
    );
    // One page short: the list ends a block early and the last entry is misread as a record.
    expectError(
      patched(data, (d) => d.writeUInt32BE(d.readUInt32BE(at.memSize + 4) - PAGE, at.memSize + 4)),
      /unknown RAM record flags/,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(d.readUInt32BE(at.memSize + 4) + PAGE, at.memSize + 4)),
      /empty name/,
    );
  });

  it('rejects unknown, retired, combined and newer-QEMU flags', () => {
    const setFlags = (f: number): Buffer => patched(data, (d) => d.writeUInt32BE(f, pageWordLo));
    expectError(setFlags(0x400 | QEMU.RAM_SAVE_FLAG_PAGE), /unknown RAM record flags 0x408/, at.page);
    expectError(
      setFlags(QEMU.RAM_SAVE_FLAG_ZERO | QEMU.RAM_SAVE_FLAG_PAGE),
      /unknown RAM record flags 0xa/,
      at.page,
    );
    expectError(setFlags(0), /unknown RAM record flags 0x0/, at.page);
    expectError(setFlags(QEMU.RAM_SAVE_FLAG_FULL), /retired/, at.page);
    expectError(setFlags(QEMU.RAM_SAVE_FLAG_HOOK), /RDMA/, at.page);
    expectError(setFlags(QEMU.RAM_SAVE_FLAG_MULTIFD_FLUSH), /QEMU 8\.0 or newer/, at.page);
    expectError(setFlags(QEMU.RAM_SAVE_FLAG_MEM_SIZE), /MEM_SIZE outside/, at.page);
    expectError(
      patched(data, (d) => d.writeUInt32BE(1, at.eos)),
      /malformed EOS/,
      at.eos,
    );
  });

  it('rejects pages beyond their block, unknown blocks and CONTINUE without a block', () => {
    expectError(
      patched(data, (d) => d.writeUInt32BE(32 * MiB + QEMU.RAM_SAVE_FLAG_PAGE, pageWordLo)),
      /beyond RAM block "ram0"/,
      at.page,
    );
    expectError(
      patched(data, (d) => d.writeUInt32BE(1, at.page)),
      /beyond RAM block "ram0"/,
      at.page,
    );
    expectError(
      patched(data, (d) => (d[at.page + 8 + 4] = 0x39)),
      /unknown RAM block "ram9"/,
      at.page,
    );
    expectError(
      patched(data, (d) =>
        d.writeUInt32BE(QEMU.RAM_SAVE_FLAG_PAGE | QEMU.RAM_SAVE_FLAG_CONTINUE, pageWordLo),
      ),
      /CONTINUE but no block named/,
      at.page,
    );
  });

  it('bounds XBZRLE and COMPRESS_PAGE lengths and checks their contents', () => {
    const word = be64(2 * PAGE + QEMU.RAM_SAVE_FLAG_XBZRLE + QEMU.RAM_SAVE_FLAG_CONTINUE);
    const tooLong = Buffer.concat([word, Buffer.from([1, 0x10, 0x01])]);
    expectError(spliced(data, at.zero, tooLong), /XBZRLE length 4097 exceeds/, at.zero + 9);
    const badEncoding = Buffer.concat([word, Buffer.from([2, 0, 2, 0, 1])]);
    expectError(spliced(data, at.zero, badEncoding), /XBZRLE record with encoding 0x2/, at.zero + 8);
    // A good XBZRLE record after the ram0 page at 0 (all 0xaa): overwrite 2 bytes at 0x10.
    const good = Buffer.concat([
      be64(QEMU.RAM_SAVE_FLAG_XBZRLE + QEMU.RAM_SAVE_FLAG_CONTINUE),
      Buffer.from([1, 0, 4, 0x10, 2, 1, 2]),
    ]);
    const m = parseStream(spliced(data, at.zero, good));
    const expected = Buffer.alloc(PAGE, 0xaa);
    expected[0x10] = 1;
    expected[0x11] = 2;
    assert.ok(m.pages[0]?.get(0)?.equals(expected));

    const cword = be64(3 * PAGE + QEMU.RAM_SAVE_FLAG_COMPRESS_PAGE + QEMU.RAM_SAVE_FLAG_CONTINUE);
    const clen = Buffer.alloc(4);
    clen.writeUInt32BE(5000);
    expectError(
      spliced(data, at.zero, Buffer.concat([cword, clen])),
      /COMPRESS_PAGE length 5000 out of range/,
      at.zero + 8,
    );
    const garbage = Buffer.from('not zlib at all');
    clen.writeUInt32BE(garbage.length);
    expectError(
      spliced(data, at.zero, Buffer.concat([cword, clen, garbage])),
      /COMPRESS_PAGE does not inflate/,
      at.zero,
    );
    const half = deflateSync(Buffer.alloc(PAGE / 2, 7));
    clen.writeUInt32BE(half.length);
    expectError(
      spliced(data, at.zero, Buffer.concat([cword, clen, half])),
      /inflates to 2048 bytes/,
      at.zero,
    );
    const page = Buffer.alloc(PAGE, 0x5c);
    const z = deflateSync(page, { level: 1 });
    clen.writeUInt32BE(z.length);
    const mc = parseStream(spliced(data, at.zero, Buffer.concat([cword, clen, z])));
    assert.ok(mc.pages[0]?.get(3 * PAGE)?.equals(page));
  });

  it('accepts return-path and advise commands, rejects postcopy and COLO', () => {
    const ping = Buffer.alloc(4);
    ping.writeUInt32BE(1);
    const advise = Buffer.concat([be64(0x1000), be64(PAGE)]);
    const withCommands = spliced(
      data,
      at.start,
      Buffer.concat([
        command(QEMU.MIG_CMD_OPEN_RETURN_PATH),
        command(QEMU.MIG_CMD_PING, ping),
        command(QEMU.MIG_CMD_POSTCOPY_ADVISE, advise),
      ]),
    );
    const m = parseStream(withCommands);
    assert.deepEqual(
      m.commands.map((c) => c.command),
      [QEMU.MIG_CMD_OPEN_RETURN_PATH, QEMU.MIG_CMD_PING, QEMU.MIG_CMD_POSTCOPY_ADVISE],
    );
    assert.equal(m.counts.page, 2);
    expectError(
      spliced(data, at.start, command(QEMU.MIG_CMD_PACKAGED, Buffer.alloc(4))),
      /postcopy streams are not supported \(command PACKAGED\)/,
      at.start,
    );
    expectError(
      spliced(data, at.part, command(QEMU.MIG_CMD_POSTCOPY_LISTEN)),
      /postcopy streams are not supported/,
      at.part,
    );
    expectError(spliced(data, at.start, command(QEMU.MIG_CMD_ENABLE_COLO)), /COLO/, at.start);
    expectError(
      spliced(data, at.start, command(QEMU.MIG_CMD_PING, Buffer.alloc(5))),
      /PING with length 5/,
      at.start,
    );
    expectError(spliced(data, at.start, command(QEMU.MIG_CMD_MAX)), /invalid command 11/, at.start);
    expectError(spliced(data, at.start, command(QEMU.MIG_CMD_INVALID)), /invalid command 0/, at.start);
    const badAdvise = Buffer.concat([be64(0x1000), be64(2 * PAGE)]);
    expectError(
      spliced(data, at.start, command(QEMU.MIG_CMD_POSTCOPY_ADVISE, badAdvise)),
      /different target page size/,
    );
  });

  it('reads the per-block page_size extra after POSTCOPY_ADVISE', () => {
    // Hand-built: ADVISE(summary 0x201000), START with ram0 (2 MiB pages) and pc.bios (host pages).
    const parts: Buffer[] = [data.subarray(0, at.start)];
    parts.push(command(QEMU.MIG_CMD_POSTCOPY_ADVISE, Buffer.concat([be64(0x201000), be64(PAGE)])));
    parts.push(
      Buffer.from([QEMU.QEMU_VM_SECTION_START, 0, 0, 0, 2, 3]),
      Buffer.from('ram'),
      Buffer.from([0, 0, 0, 0, 0, 0, 0, 4]),
    );
    parts.push(be64(32 * MiB + 256 * 1024 + QEMU.RAM_SAVE_FLAG_MEM_SIZE));
    parts.push(Buffer.from([4]), Buffer.from('ram0'), be64(32 * MiB), be64(0x200000));
    parts.push(Buffer.from([7]), Buffer.from('pc.bios'), be64(256 * 1024));
    parts.push(be64(QEMU.RAM_SAVE_FLAG_EOS), Buffer.from([QEMU.QEMU_VM_SECTION_FOOTER, 0, 0, 0, 2]));
    parts.push(
      Buffer.from([QEMU.QEMU_VM_SECTION_END, 0, 0, 0, 2]),
      be64(QEMU.RAM_SAVE_FLAG_PAGE),
      Buffer.from([4]),
      Buffer.from('ram0'),
    );
    parts.push(
      Buffer.alloc(PAGE, 1),
      be64(QEMU.RAM_SAVE_FLAG_EOS),
      Buffer.from([QEMU.QEMU_VM_SECTION_FOOTER, 0, 0, 0, 2]),
    );
    parts.push(data.subarray(at.device));
    const m = parseStream(Buffer.concat(parts));
    assert.deepEqual(m.blocks, [
      { name: 'ram0', usedLength: 32 * MiB, pageSize: 0x200000 },
      { name: 'pc.bios', usedLength: 256 * 1024 },
    ]);
    assert.equal(m.counts.page, 1);
  });

  it('bounds the device state and verifies it against the VMDESC', () => {
    expectError(data, /device state exceeds the limit of 1000 bytes/, at.device + 1000, {
      maxDeviceStateBytes: 1000,
    });
    const json = data.indexOf('{"page_size"', at.device);
    assert.ok(json > at.device);
    // A size in the JSON that no longer matches the bytes.
    const size = data.indexOf('"size": 8', json);
    expectError(
      patched(data, (d) => (d[size + 8] = 0x39)),
      /bad footer of FULL section timer/,
    );
    // JSON that does not parse (same length).
    const colon = data.indexOf(':', json);
    expectError(
      patched(data, (d) => (d[colon] = 0x3b)),
      /VMDESC JSON does not parse/,
      json,
    );
    // A flipped byte in a section footer.
    const blob = s.model.deviceBlob as Buffer;
    const firstFooter = at.device + blob.indexOf(Buffer.from([QEMU.QEMU_VM_SECTION_FOOTER, 0, 0, 0, 0]), 1);
    expectError(
      patched(data, (d) => (d[firstFooter + 4] = 9)),
      /bad footer of FULL section timer/,
      firstFooter,
    );
    // Bytes after the JSON.
    expectError(Buffer.concat([data, Buffer.from([0])]), /./);
  });

  it('accepts device state without VMDESC unverified, unless required', () => {
    const json = data.indexOf('{"page_size"', at.device);
    const eofOnly = data.subarray(0, json - 5);
    assert.equal(eofOnly.at(-1), QEMU.QEMU_VM_EOF);
    const m = parseStream(eofOnly);
    assert.deepEqual(m.deviceInfo, { sections: 30, vmdescJsonBytes: 0, verified: false, runstate: 'paused' });
    expectError(eofOnly, /without a VM description/, eofOnly.length, { requireVmdesc: true });
    // Without VMDESC a cut after any 0x00 byte inside the device area is still caught by the walk.
    let caught = 0;
    for (let i = at.device; i < eofOnly.length - 1; i += 3) {
      if (eofOnly[i] !== 0) continue;
      parseError(eofOnly.subarray(0, i + 1));
      caught++;
    }
    assert.ok(caught > 50, `${caught} cuts`);
  });

  it('reports truncation at every offset of the synthetic stream head and tail', () => {
    for (let cut = 0; cut < at.device + 64; cut++) {
      const err = expectError(data.subarray(0, cut), /truncated|./);
      assert.ok(err.offset <= cut, `offset ${err.offset} > cut ${cut}`);
    }
    assert.match(
      parseError(data.subarray(0, at.page + 100)).message,
      /truncated stream: it ends inside a RAM section/,
    );
    assert.match(
      parseError(data.subarray(0, at.device)).message,
      /truncated stream: it ends between sections/,
    );
    for (let cut = data.length - 200; cut < data.length; cut++) expectError(data.subarray(0, cut), /./);
  });

  it('stays failed after an error and refuses data after end()', () => {
    const r = new MigrationStreamReader(nullSink);
    assert.throws(() => r.push(Buffer.from('XXXXXXXX')), StreamError);
    assert.throws(() => r.push(data), /bad magic/);
    assert.throws(() => r.end(), /bad magic/);
    const ok = new MigrationStreamReader(nullSink);
    ok.push(data);
    ok.end();
    ok.end();
    assert.equal(ok.complete, true);
    assert.throws(() => ok.push(Buffer.from([0])), /push\(\) after end\(\)/);
  });
});

// ---- XBZRLE ------------------------------------------------------------------------------------------

/** Reference encoder with QEMU's grammar (xbzrle_encode_buffer), for the property test. */
function xbzrleEncode(old: Buffer, cur: Buffer): Buffer {
  const out: number[] = [];
  const uleb = (v: number): void => {
    if (v < 0x80) out.push(v);
    else out.push((v & 0x7f) | 0x80, v >> 7);
  };
  let i = 0;
  while (i < cur.length) {
    let skip = 0;
    while (i + skip < cur.length && old[i + skip] === cur[i + skip]) skip++;
    if (i + skip === cur.length) break;
    i += skip;
    let n = 0;
    while (i + n < cur.length && old[i + n] !== cur[i + n]) n++;
    uleb(skip);
    uleb(n);
    for (let k = 0; k < n; k++) out.push(cur[i + k] as number);
    i += n;
  }
  return Buffer.from(out);
}

describe('applyXbzrle', () => {
  it('round-trips random page edits through a reference encoder', () => {
    const r = rng(7);
    for (let iter = 0; iter < 300; iter++) {
      const old = Buffer.alloc(PAGE);
      for (let k = 0; k < PAGE; k++) old[k] = Math.floor(r() * 4);
      const cur = Buffer.from(old);
      const edits = Math.floor(r() * 40);
      for (let e = 0; e < edits; e++) {
        const start = Math.floor(r() * PAGE);
        const len = Math.floor(r() * 300);
        for (let k = start; k < Math.min(PAGE, start + len); k++)
          cur[k] = (cur[k] as number) ^ (1 + Math.floor(r() * 200));
      }
      const delta = xbzrleEncode(old, cur);
      const target = Buffer.from(old);
      applyXbzrle(target, delta, 0);
      assert.ok(target.equals(cur), `iteration ${iter}`);
    }
  });

  it('rejects malformed deltas', () => {
    const cases: [number[], RegExp][] = [
      [[0x00, 0x00], /literal run of length 0/],
      [[0x00, 0x01, 0xaa, 0x00, 0x01, 0xbb], /zero skip after the first run/],
      [[0x80, 0x80, 0x01], /skip length longer than 2 bytes/],
      [[0x00, 0x80, 0x80], /literal count longer than 2 bytes/],
      [[0x05], /truncated before a literal count/],
      [[0x80], /truncated in a skip length/],
      [[0x00, 0x03, 0x01], /passes the end of the page or the delta/],
      [[0xff, 0x1f, 0x02, 0x01, 0x02], /passes the end/],
    ];
    for (const [bytes, message] of cases) {
      assert.throws(
        () => applyXbzrle(Buffer.alloc(PAGE), Buffer.from(bytes), 1234),
        (err: unknown) => {
          assert.ok(err instanceof StreamError);
          assert.match(err.message, message);
          assert.equal(err.offset, 1234);
          return true;
        },
      );
    }
  });
});

// ---- fuzz ----------------------------------------------------------------------------------------------

/** Push `data` in random chunks and end(); returns the error (StreamError) or null on success. */
function fuzzParse(
  data: Buffer,
  r: () => number,
): { err: unknown; reader: MigrationStreamReader; verified: boolean } {
  let verified = false;
  const sink: StreamSink = { ...nullSink, onDeviceState: (_b, info) => void (verified = info.verified) };
  const reader = new MigrationStreamReader(sink, { maxRamBytes: 64 * MiB });
  try {
    for (let i = 0; i < data.length;) {
      const n = r() < 0.5 ? 1 + Math.floor(r() * 64) : 1 + Math.floor(r() * 200_000);
      reader.push(data.subarray(i, i + n));
      i += n;
    }
    reader.end();
    return { err: null, reader, verified };
  } catch (err) {
    return { err, reader, verified };
  }
}

describe('fuzz (seeded, time-bounded)', { timeout: 60_000 }, () => {
  const data = loadFixture('precopyRunning');
  // Record boundaries from a clean parse, to aim mutations at headers.
  const boundaries: number[] = [];
  {
    let reader: MigrationStreamReader | null = null;
    const note = (): void => void boundaries.push(reader?.offset ?? 0);
    reader = new MigrationStreamReader({
      onConfiguration: note,
      onRamStart: note,
      onBlockList: note,
      onPage: note,
      onZeroPage: note,
      onXbzrlePage: note,
      onRamSectionEnd: note,
      onDeviceState: note,
      onCommand: note,
    });
    reader.push(data);
    reader.end();
  }
  const jsonLen = data.length - data.lastIndexOf(QEMU.QEMU_VM_VMDESCRIPTION) - 5;
  const afterEof = data.length - jsonLen - 5;

  it('truncated streams always end in a StreamError, never complete', () => {
    const r = rng(42);
    const deadline = Date.now() + 2000;
    let n = 0;
    const cuts = [afterEof - 1, afterEof + 1, afterEof + 5, data.length - 1];
    for (let c = 0; c < 2048; c++) cuts.push(c);
    while (Date.now() < deadline) {
      const cut = cuts.length > 0 ? (cuts.shift() as number) : Math.floor(r() * data.length);
      const { err, reader } = fuzzParse(data.subarray(0, cut), r);
      assert.ok(err instanceof StreamError, `cut at ${cut}: ${String(err)}`);
      assert.equal(reader.complete, false);
      n++;
    }
    // The one truncation the format cannot tell apart from a complete stream: right after EOF,
    // where an optional VMDESC would begin. It is accepted, but never as verified.
    const { err, reader, verified } = fuzzParse(data.subarray(0, afterEof), r);
    assert.equal(err, null);
    assert.equal(reader.complete, true);
    assert.equal(verified, false);
    assert.ok(n > 2100, `only ${n} truncations`);
  });

  it('mutated streams end in a StreamError or parse; nothing else is thrown', () => {
    const r = rng(4242);
    const deadline = Date.now() + 3000;
    const outcome = { error: 0, ok: 0 };
    while (Date.now() < deadline) {
      const d = Buffer.from(data);
      let mutated: Buffer = d;
      const mode = r();
      if (mode < 0.45) {
        // 1-3 byte flips aimed at record headers
        for (let k = 0, flips = 1 + Math.floor(r() * 3); k < flips; k++) {
          const b = boundaries[Math.floor(r() * boundaries.length)] as number;
          const p = Math.min(d.length - 1, b + Math.floor(r() * 14));
          d[p] = (d[p] as number) ^ (1 << Math.floor(r() * 8));
        }
      } else if (mode < 0.8) {
        // random byte anywhere
        const p = Math.floor(r() * d.length);
        d[p] = Math.floor(r() * 256);
      } else {
        // insert or delete a short run (desynchronises everything after it)
        const p = Math.floor(r() * d.length);
        const n = 1 + Math.floor(r() * 16);
        mutated =
          r() < 0.5
            ? spliced(d, p, Buffer.alloc(n, Math.floor(r() * 256)))
            : spliced(d, p, Buffer.alloc(0), n);
      }
      const { err, reader } = fuzzParse(mutated, r);
      if (err === null) {
        assert.equal(reader.complete, true);
        outcome.ok++;
      } else {
        assert.ok(
          err instanceof StreamError,
          `not a StreamError: ${err instanceof Error ? err.stack : String(err)}`,
        );
        assert.ok(err.offset >= 0 && err.offset <= mutated.length, `offset ${err.offset}`);
        assert.equal(reader.complete, false);
        outcome.error++;
      }
    }
    assert.ok(outcome.error > 100, JSON.stringify(outcome));
    console.log(`fuzz mutations: ${JSON.stringify(outcome)}`);
  });
});
