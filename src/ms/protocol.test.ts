import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { ProtocolError } from './errors.js';
import {
  FRAME,
  FrameDecoder,
  HEADER_BYTES,
  MAX_EXTENT_BYTES,
  PROTOCOL_VERSION,
  decodeBlob,
  decodeExtent,
  decodePages,
  encodeBlobHead,
  encodeExtentHead,
  encodePagesHead,
  encodeHeader,
  frameParts,
  maxPayload,
} from './protocol.js';

interface Got {
  type: number;
  id: number;
  payload: Buffer;
  version: number;
}

function collect(): { decoder: FrameDecoder; got: Got[] } {
  const got: Got[] = [];
  const decoder = new FrameDecoder((type, id, payload, version) => got.push({ type, id, payload, version }));
  return { decoder, got };
}

function sampleStream(): { bytes: Buffer; frames: Array<{ type: number; id: number; payload: Buffer }> } {
  const frames = [
    { type: FRAME.HELLO, id: 0, payload: randomBytes(32) },
    { type: FRAME.LIST, id: 1, payload: Buffer.from('{}') },
    { type: FRAME.PUT_EXTENT, id: 2, payload: randomBytes(70_000) },
    { type: FRAME.OK, id: 3, payload: Buffer.alloc(0) },
    { type: FRAME.PUT_BLOB, id: 0xffffffff, payload: randomBytes(5) },
  ];
  return { bytes: Buffer.concat(frames.flatMap((f) => frameParts(f.type, f.id, [f.payload]))), frames };
}

describe('frame decoder', () => {
  it('decodes a stream whole, byte by byte, and split at every point', () => {
    const { bytes, frames } = sampleStream();
    const check = (got: Got[]): void => {
      assert.equal(got.length, frames.length);
      got.forEach((g, i) => {
        const f = frames[i];
        assert.ok(f);
        assert.equal(g.type, f.type);
        assert.equal(g.id, f.id);
        assert.equal(g.version, PROTOCOL_VERSION);
        assert.ok(g.payload.equals(f.payload));
      });
    };
    const whole = collect();
    whole.decoder.push(bytes);
    check(whole.got);
    assert.ok(whole.decoder.atBoundary);

    const bytewise = collect();
    for (let i = 0; i < bytes.length; i++) bytewise.decoder.push(bytes.subarray(i, i + 1));
    check(bytewise.got);

    for (const cut of [1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, 40, 60, 1000, bytes.length - 1]) {
      const split = collect();
      split.decoder.push(bytes.subarray(0, cut));
      split.decoder.push(bytes.subarray(cut));
      check(split.got);
    }
  });

  it('hands out a view of the chunk when the frame lies within it, and keeps spanning payloads intact', () => {
    const payload = randomBytes(100);
    const chunk = Buffer.concat(frameParts(FRAME.OK, 7, [payload]));
    const { decoder, got } = collect();
    decoder.push(chunk);
    assert.equal(got[0]?.payload.buffer, chunk.buffer, 'zero-copy view');
    // A payload assembled from chunks stays valid when later chunks arrive.
    const two = Buffer.concat([
      ...frameParts(FRAME.OK, 1, [payload]),
      ...frameParts(FRAME.OK, 2, [randomBytes(100)]),
    ]);
    const s = collect();
    s.decoder.push(two.subarray(0, 50));
    s.decoder.push(two.subarray(50));
    assert.ok(s.got[0]?.payload.equals(payload));
  });

  it('refuses garbage, unknown flags and unknown types with the byte offset', () => {
    const { decoder } = collect();
    assert.throws(
      () => decoder.push(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')),
      (err: unknown) => {
        assert.ok(err instanceof ProtocolError);
        assert.equal(err.code, 'E_MS_PROTOCOL');
        assert.match(err.message, /not a tlc memory-server frame .*at byte 0/);
        return true;
      },
    );
    // Once failed, always failed: no resynchronising on attacker-chosen bytes.
    assert.throws(() => decoder.push(Buffer.concat(frameParts(FRAME.OK, 1, []))), ProtocolError);

    const flags = encodeHeader(FRAME.OK, 1, 0);
    flags.writeUInt8(0x80, 7);
    assert.throws(() => collect().decoder.push(flags), /unknown flags 0x80/);

    const unknown = encodeHeader(FRAME.OK, 1, 0);
    unknown.writeUInt8(99, 6);
    assert.throws(() => collect().decoder.push(unknown), /unknown frame type 99/);

    const { bytes } = sampleStream();
    const second = collect();
    second.decoder.push(bytes.subarray(0, HEADER_BYTES + 32));
    assert.throws(() => second.decoder.push(Buffer.from('garbage after a good frame')), /at byte 48/);
  });

  it('refuses an oversized frame from its header alone, before buffering any of it', () => {
    const header = encodeHeader(FRAME.PUT_EXTENT, 1, maxPayload(FRAME.PUT_EXTENT) + 1);
    const { decoder, got } = collect();
    assert.throws(() => decoder.push(header), /exceeds the limit/);
    assert.equal(got.length, 0);
    // The pre-authentication cap applies to every type.
    const capped = collect();
    capped.decoder.payloadCap = 64;
    assert.throws(() => capped.decoder.push(encodeHeader(FRAME.LIST, 1, 65)), /exceeds the limit of 64/);
    assert.throws(() => frameParts(FRAME.LIST, 1, [Buffer.alloc(maxPayload(FRAME.LIST) + 1)]), RangeError);
  });

  it('survives random input: only ProtocolErrors, never a crash or a huge allocation', () => {
    const deadline = Date.now() + 500;
    let n = 0;
    while (Date.now() < deadline) {
      const { decoder } = collect();
      // Half the cases start with a valid magic so the fuzzer reaches the later checks.
      const junk = randomBytes(1 + (n % 200));
      if (n % 2 === 0 && junk.length >= 4) junk.writeUInt32BE(0x544c4d53, 0);
      try {
        decoder.push(junk);
      } catch (err) {
        assert.ok(err instanceof ProtocolError, String(err));
      }
      n++;
    }
    assert.ok(n > 100);
  });
});

describe('records', () => {
  it('round-trips an extent record with its checksum and a 64-bit offset', () => {
    const data = randomBytes(4096);
    const sha256 = createHash('sha256').update(data).digest();
    const head = encodeExtentHead({
      ckpt: 'vm1-20261123-ab',
      block: '/rom@etc/acpi/tables',
      index: 7,
      offset: 2 ** 40,
      sha256,
    });
    const r = decodeExtent(Buffer.concat([head, data]));
    assert.equal(r.ckpt, 'vm1-20261123-ab');
    assert.equal(r.block, '/rom@etc/acpi/tables');
    assert.equal(r.index, 7);
    assert.equal(r.offset, 2 ** 40);
    assert.ok(r.sha256.equals(sha256));
    assert.ok(r.data.equals(data));
  });

  it('reports a truncated record with the field and offset', () => {
    const head = encodeExtentHead({
      ckpt: 'c',
      block: 'pc.ram',
      index: 1,
      offset: 0,
      sha256: Buffer.alloc(32),
    });
    for (let cut = 0; cut < head.length; cut++)
      assert.throws(
        () => decodeExtent(head.subarray(0, cut)),
        (err: unknown) => err instanceof ProtocolError && /truncated/.test(err.message),
      );
    assert.throws(() => decodeExtent(Buffer.concat([head, Buffer.alloc(MAX_EXTENT_BYTES + 1)])), /exceeds/);
  });

  it('round-trips a blob record', () => {
    const data = Buffer.from('{"manifest":1}');
    const sha256 = createHash('sha256').update(data).digest();
    const r = decodeBlob(
      Buffer.concat([encodeBlobHead({ ckpt: 'c1', name: 'manifest.json', sha256 }), data]),
    );
    assert.deepEqual([r.ckpt, r.name, r.data.toString()], ['c1', 'manifest.json', '{"manifest":1}']);
    assert.throws(() => encodeBlobHead({ ckpt: '', name: 'x', sha256 }), RangeError);
  });

  it('round-trips a pages record and refuses runs outside an extent or data of the wrong length', () => {
    const runs = [
      { at: 0, data: randomBytes(4096) },
      { at: 8192, data: randomBytes(100) },
    ];
    const sha256 = createHash('sha256')
      .update(runs[0]?.data as Buffer)
      .update(runs[1]?.data as Buffer)
      .digest();
    const head = encodePagesHead({ ckpt: 'c1', block: 'pc.ram', index: 5, runs, sha256 });
    const r = decodePages(Buffer.concat([head, ...runs.map((x) => x.data)]));
    assert.deepEqual(
      r.runs.map((x) => [x.at, x.data.length]),
      [
        [0, 4096],
        [8192, 100],
      ],
    );
    assert.ok(r.runs[1]?.data.equals(runs[1]?.data as Buffer));
    assert.equal(r.index, 5);
    assert.throws(
      () => decodePages(Buffer.concat([head, runs[0]?.data as Buffer])),
      /carries 4096 data bytes, its runs say 4196/,
    );
    const outside = encodePagesHead({
      ckpt: 'c1',
      block: 'b',
      index: 0,
      runs: [{ at: MAX_EXTENT_BYTES - 1, data: Buffer.alloc(2) }],
      sha256,
    });
    assert.throws(() => decodePages(Buffer.concat([outside, Buffer.alloc(2)])), /outside an extent/);
    assert.throws(() => encodePagesHead({ ckpt: 'c1', block: 'b', index: 0, runs: [], sha256 }), RangeError);
  });
});
