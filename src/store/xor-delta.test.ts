import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { TlcError } from '../core/errors.js';
import { applyXorDelta, encodeXorDelta } from './xor-delta.js';

const PAGE = 4096;

function flip(buf: Buffer, at: number, bits: number): void {
  buf[at] = (buf[at] as number) ^ bits;
}

/** Encodes `cur` against `prev` and, when it fits, checks the decode gives `cur` back. */
function roundTrip(prev: Buffer, cur: Buffer, limit = PAGE): number {
  const out = Buffer.alloc(limit);
  const n = encodeXorDelta(cur, 0, prev, 0, PAGE, out, 0, limit);
  if (n < 0) return n;
  const page = Buffer.from(prev);
  applyXorDelta(page, 0, PAGE, out, 0, n);
  assert.ok(page.equals(cur), 'decoded page equals the new page');
  return n;
}

describe('XOR sub-page deltas', () => {
  it('unchanged page: empty delta', () => {
    const p = randomBytes(PAGE);
    assert.equal(roundTrip(p, Buffer.from(p)), 0);
  });

  it('one byte incremented (QEMU migration-test style): 3 bytes', () => {
    const prev = randomBytes(PAGE);
    for (const at of [0, 1, 100, 4095]) {
      const cur = Buffer.from(prev);
      cur[at] = ((cur[at] as number) + 1) & 0xff;
      const n = roundTrip(prev, cur);
      assert.ok(n > 0 && n <= 4, `byte at ${at}: ${n} bytes`);
    }
  });

  it('an 8-byte counter and scattered changes round-trip', () => {
    const prev = randomBytes(PAGE);
    const cur = Buffer.from(prev);
    cur.writeBigUInt64LE(123456789n, 512);
    for (let i = 0; i < 40; i++) flip(cur, (i * 97) % PAGE, 0xff);
    const n = roundTrip(prev, cur);
    assert.ok(n > 0 && n < 300, `${n} bytes`);
  });

  it('random pages and random edits round-trip (offsets within larger buffers too)', () => {
    for (let t = 0; t < 300; t++) {
      const prev = randomBytes(PAGE);
      const cur = Buffer.from(prev);
      const edits = t % 50;
      for (let e = 0; e < edits; e++) {
        const at = Math.floor(Math.random() * PAGE);
        const len = 1 + Math.floor(Math.random() * 64);
        randomBytes(Math.min(len, PAGE - at)).copy(cur, at);
      }
      roundTrip(prev, cur);
    }
    const big = randomBytes(3 * PAGE);
    const prevBig = Buffer.from(big);
    flip(big, PAGE + 7, 1);
    const out = Buffer.alloc(64);
    const n = encodeXorDelta(big, PAGE, prevBig, PAGE, PAGE, out, 10, 50);
    assert.ok(n > 0);
    const page = Buffer.from(prevBig);
    applyXorDelta(page, PAGE, PAGE, out, 10, n);
    assert.ok(page.equals(big));
  });

  it('worst cases fall back to the full page: every byte changed, alternating bytes', () => {
    const prev = randomBytes(PAGE);
    const all = Buffer.from(prev.map((b) => b ^ 0xff));
    assert.equal(roundTrip(prev, all), -1);
    const alternate = Buffer.from(prev);
    for (let i = 0; i < PAGE; i += 2) flip(alternate, i, 1);
    assert.equal(roundTrip(prev, alternate), -1);
    // Just over the limit given: -1; the encoder never writes past `limit` bytes.
    const few = Buffer.from(prev);
    for (let i = 0; i < 10; i++) flip(few, i * 300, 1);
    const exact = roundTrip(prev, few);
    assert.ok(exact > 0);
    const out = Buffer.alloc(exact + 16, 0xee);
    assert.equal(encodeXorDelta(few, 0, prev, 0, PAGE, out, 0, exact), -1);
    assert.ok(
      out.subarray(exact).every((b) => b === 0xee),
      'nothing written past the limit',
    );
  });

  it('hostile deltas: typed error, no byte outside the page changes, nothing read past the input', () => {
    const guard = 0xab;
    const bad: [string, number[]][] = [
      ['truncated length', [0x80]],
      ['length too long', [0xff, 0xff, 0xff, 0x01, 0x01, 0x00]],
      ['empty record', [0x00, 0x00]],
      ['skip past the page', [0xa0, 0x20, 0x01, 0x00]], // skip 4128
      ['count past the page', [0x00, 0x81, 0x20, 0x00]], // count 4097
      ['skip + count past the page', [0xff, 0x1f, 0x02, 0x01, 0x02]], // 4095 + 2
      ['truncated record', [0x00, 0x05, 0x01, 0x02]],
      ['missing count', [0x05]],
    ];
    for (const [what, bytes] of bad) {
      const buf = Buffer.alloc(PAGE + 2, guard);
      const delta = Buffer.from([...bytes, 0x7f, 0x7f]); // bytes after deltaLen must never be read
      assert.throws(
        () => applyXorDelta(buf, 1, PAGE, delta, 0, bytes.length),
        (err: unknown) => err instanceof TlcError && err.code === 'E_CORRUPT',
        what,
      );
      assert.equal(buf[0], guard, `${what}: byte before the page untouched`);
      assert.equal(buf[PAGE + 1], guard, `${what}: byte after the page untouched`);
    }
    assert.throws(() => applyXorDelta(Buffer.alloc(PAGE), 1, PAGE, Buffer.alloc(4), 0, 4), TlcError);
    assert.throws(() => applyXorDelta(Buffer.alloc(PAGE), 0, PAGE, Buffer.alloc(4), 2, 4), TlcError);
  });

  it('random garbage never escapes the page', () => {
    for (let t = 0; t < 2000; t++) {
      const buf = Buffer.alloc(PAGE + 2, 0x5c);
      const delta = randomBytes(1 + (t % 40));
      try {
        applyXorDelta(buf, 1, PAGE, delta, 0, delta.length);
      } catch (err) {
        assert.ok(err instanceof TlcError);
      }
      assert.equal(buf[0], 0x5c);
      assert.equal(buf[PAGE + 1], 0x5c);
    }
  });
});
