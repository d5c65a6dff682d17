import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { extentsOnServer, placeExtent } from './placement.js';

describe('extent placement', () => {
  it('puts extent k on k mod N, k+1 mod N, ... (distinct servers)', () => {
    assert.deepEqual(placeExtent(0, 3, 2), [0, 1]);
    assert.deepEqual(placeExtent(1, 3, 2), [1, 2]);
    assert.deepEqual(placeExtent(2, 3, 2), [2, 0]);
    assert.deepEqual(placeExtent(5, 3, 3), [2, 0, 1]);
    assert.deepEqual(placeExtent(9, 1, 1), [0]);
    for (let k = 0; k < 50; k++) {
      const p = placeExtent(k, 4, 3);
      assert.equal(new Set(p).size, 3);
    }
  });

  it('spreads every replica evenly: each server holds replicas/N of the extents', () => {
    const servers = 4;
    const extents = 400;
    for (const replicas of [1, 2, 3]) {
      for (let s = 0; s < servers; s++)
        assert.equal(extentsOnServer(s, extents, servers, replicas).length, (extents * replicas) / servers);
    }
  });

  it('refuses impossible requests', () => {
    assert.throws(() => placeExtent(0, 2, 3), /replicas must be 1..2/);
    assert.throws(() => placeExtent(0, 0, 1), /at least one server/);
    assert.throws(() => placeExtent(-1, 2, 1), /index/);
    assert.throws(() => placeExtent(0, 2, 0), /replicas/);
  });
});
