import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  BOOT_OK_PREFIX,
  parseCorruption,
  parseDiskTornTail,
  parseDiskVerdict,
  parseHeartbeat,
  scanConsole,
} from './heartbeat.js';
import { continuationProblems } from './observe.js';

test('parses a memverify heartbeat', () => {
  assert.deepEqual(
    parseHeartbeat(
      'memverify: heartbeat seq=12 pages=345678 digest=00ff00ff00ff00ff maxstall_us=1234 corrupt=0\r',
    ),
    { kind: 'memverify', seq: 12, pages: 345678, digest: '00ff00ff00ff00ff', maxStallUs: 1234, corrupt: 0 },
  );
});

test('parses dirty and idle heartbeats', () => {
  assert.deepEqual(parseHeartbeat('dirty: heartbeat seq=3 updates=1000 rate=9999 maxstall_us=7'), {
    kind: 'dirty',
    seq: 3,
    updates: 1000,
    rate: 9999,
    maxStallUs: 7,
  });
  assert.deepEqual(parseHeartbeat('idle: heartbeat seq=41\r'), { kind: 'idle', seq: 41 });
});

test('accepts a heartbeat that shares its line with earlier console noise', () => {
  assert.deepEqual(parseHeartbeat('[    3.1] random: crng init done idle: heartbeat seq=5'), {
    kind: 'idle',
    seq: 5,
  });
});

test('rejects malformed or truncated heartbeats', () => {
  for (const line of [
    '',
    'idle: heartbeat seq=',
    'idle: heartbeat seq=12x',
    'xidle: heartbeat seq=1',
    'memverify: heartbeat seq=1 pages=2 digest=00ff maxstall_us=1 corrupt=0',
    'memverify: heartbeat seq=1 pages=2 digest=00ff00ff00ff00ff maxstall_us=1',
    'dirty: heartbeat seq=1 updates=2 rate=3',
    'memverify: filled pages=16384',
  ]) {
    assert.equal(parseHeartbeat(line), null, line);
  }
});

test('parses a corruption report', () => {
  assert.deepEqual(
    parseCorruption(
      'memverify: CORRUPT page=12138 offset=2048 expected=35d872ba30694243 got=35d872bacf694243\r',
    ),
    { page: 12138, offset: 2048, expected: '35d872ba30694243', got: '35d872bacf694243' },
  );
  assert.equal(parseCorruption('memverify: CORRUPT page=1 offset=8 expected=0 got=1'), null);
  assert.equal(
    parseCorruption('memverify: heartbeat seq=1 pages=2 digest=00ff00ff00ff00ff maxstall_us=1 corrupt=0'),
    null,
  );
});

test('scans a console log, ignoring an incomplete last line', () => {
  const log = [
    '[    0.000000] Linux version 6.1.0',
    `${BOOT_OK_PREFIX} workload=memverify:64`,
    'memverify: start mib=64 pages=16384 rate=0',
    'memverify: filled pages=16384',
    'memverify: heartbeat seq=1 pages=10 digest=0000000000000001 maxstall_us=5 corrupt=0',
    'memverify: CORRUPT page=7 offset=16 expected=0000000000000001 got=0000000000000002',
    'memverify: heartbeat seq=2 pages=20 digest=0000000000000002 maxstall_us=6 corrupt=1',
    'tlc-guest: workload exited status=137',
    `${BOOT_OK_PREFIX} workload=memverify:64`,
    'memverify: heartbeat seq=1 pages=10 digest=000000000000000',
  ].join('\r\n');
  const scan = scanConsole(log);
  assert.equal(scan.boots, 2);
  assert.deepEqual(
    scan.heartbeats.map((h) => h.seq),
    [1, 2],
  );
  assert.deepEqual(scan.corruptions, [
    { page: 7, offset: 16, expected: '0000000000000001', got: '0000000000000002' },
  ]);
  assert.deepEqual(scan.workloadExits, [137]);
});

test('scans an empty log', () => {
  assert.deepEqual(scanConsole(''), {
    boots: 0,
    heartbeats: [],
    corruptions: [],
    workloadExits: [],
    diskVerdicts: [],
    diskTornTails: [],
  });
});

test('parses diskverify synced lines as heartbeats, and its verdicts', () => {
  assert.deepEqual(parseHeartbeat('diskverify: synced seq=296 fsync_us=14060 maxstall_us=6786\r'), {
    kind: 'diskverify',
    seq: 296,
    fsyncUs: 14060,
    maxStallUs: 6786,
  });
  assert.equal(parseHeartbeat('diskverify: synced seq=296 fsync_us=14060'), null);
  assert.deepEqual(parseDiskVerdict('diskverify: verify ok records=296\r'), { ok: true, records: 296 });
  assert.deepEqual(
    parseDiskVerdict('diskverify: verify FAILED record=17 reason=checksum valid=16 records=40'),
    {
      ok: false,
      record: 17,
      reason: 'checksum',
      valid: 16,
      records: 40,
    },
  );
  assert.equal(
    parseDiskVerdict('diskverify: verify FAILED record=17 reason=gremlins valid=16 records=40'),
    null,
  );
  assert.deepEqual(
    parseDiskTornTail('diskverify: torn tail truncated record=301 dropped=2 bytes=700 reason=partial'),
    {
      record: 301,
      dropped: 2,
      bytes: 700,
      reason: 'partial',
    },
  );
});

test("checks a combined guest's memory and disk heartbeats each on their own", () => {
  const log = (lines: string[]): string => lines.map((l) => `${l}\r\n`).join('');
  const fine = scanConsole(
    log([
      'memverify: heartbeat seq=7 pages=70 digest=0000000000000007 maxstall_us=5 corrupt=0',
      'diskverify: synced seq=48 fsync_us=900 maxstall_us=40',
      'memverify: heartbeat seq=8 pages=80 digest=0000000000000008 maxstall_us=5 corrupt=0',
      'diskverify: synced seq=56 fsync_us=900 maxstall_us=40',
    ]),
  );
  assert.deepEqual(continuationProblems(fine, 7), []);
  const bad = scanConsole(
    log([
      'diskverify: synced seq=56 fsync_us=900 maxstall_us=40',
      'diskverify: synced seq=48 fsync_us=900 maxstall_us=40',
      'diskverify: verify FAILED record=17 reason=chain valid=16 records=40',
    ]),
  );
  assert.deepEqual(continuationProblems(bad, undefined), [
    'diskverify synced seq went from 56 back to 48',
    'diskverify: record 17 is bad (chain) after 16 good ones',
  ]);
});
