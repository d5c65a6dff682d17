/**
 * Parsing of the test guest's serial console (see guest/*.c and guest/init.sh).
 *
 * Lines (the tty turns "\n" into "\r\n"; a stray kernel message may precede a line):
 *   tlc-guest: boot ok workload=<spec>
 *   tlc-guest: workload exited status=<n>
 *   memverify: heartbeat seq=<n> pages=<n> digest=<16 hex> maxstall_us=<n> corrupt=<n>
 *   memverify: CORRUPT page=<i> offset=<n> expected=<16 hex> got=<16 hex>
 *   dirty: heartbeat seq=<n> updates=<n> rate=<n> maxstall_us=<n>
 *   idle: heartbeat seq=<n>
 *   diskverify: synced seq=<last synced record> fsync_us=<n> maxstall_us=<n>
 *   diskverify: torn tail truncated record=<seq> dropped=<n> bytes=<n> reason=<reason>
 *   diskverify: verify ok records=<n>
 *   diskverify: verify FAILED record=<seq> reason=<reason> valid=<n> records=<n>
 *
 * diskverify's `synced` line is its heartbeat: `seq` is the newest record made durable by the
 * fsync just done, so it grows by the sync batch (8), not by 1, and a restored guest continues
 * from its own last record. The `verify` lines are printed once per boot, before any `synced`.
 *
 * memverify's `pages` counts rewrites after the initial fill and `digest` folds the
 * (index, version) of each of them; both are deterministic, so two runs (or a run and its
 * restored copy) report the same digest at the same `pages` count. `maxstall_us` is the
 * longest gap between two loop iterations since the previous heartbeat: a paused VM
 * shows up there (for memverify with a rate, gaps of ~1/rate are normal).
 */

export const BOOT_OK_PREFIX = 'tlc-guest: boot ok';
export const WORKLOAD_EXIT_PREFIX = 'tlc-guest: workload exited status=';

export interface MemverifyHeartbeat {
  kind: 'memverify';
  seq: number;
  /** Pages rewritten since the initial fill. */
  pages: number;
  /** 16 lowercase hex digits. */
  digest: string;
  maxStallUs: number;
  /** Corrupted page verifications seen so far. */
  corrupt: number;
}

export interface DirtyHeartbeat {
  kind: 'dirty';
  seq: number;
  /** Page writes since start. */
  updates: number;
  /** Page writes per second over the last interval. */
  rate: number;
  maxStallUs: number;
}

export interface IdleHeartbeat {
  kind: 'idle';
  seq: number;
}

export interface DiskverifyHeartbeat {
  kind: 'diskverify';
  /** Newest record (sequence number) made durable by the fsync just done. */
  seq: number;
  fsyncUs: number;
  /** Longest delay of a record write past its due time since the previous synced line. */
  maxStallUs: number;
}

export type Heartbeat = MemverifyHeartbeat | DirtyHeartbeat | IdleHeartbeat | DiskverifyHeartbeat;

/** Why diskverify rejected a record: see guest/diskverify.c. */
export type DiskRecordFault = 'zero' | 'magic' | 'seq' | 'checksum' | 'chain' | 'partial';

/** diskverify's start-up verification of its records file. */
export type DiskVerdict =
  | {
      ok: true;
      /** Good records kept. */
      records: number;
    }
  | {
      ok: false;
      /** Sequence number (1-based position) of the first bad record. */
      record: number;
      reason: DiskRecordFault;
      /** Good records before it. */
      valid: number;
      /** Record slots in the file. */
      records: number;
    };

/** A bad tail that diskverify accepted as what a crash leaves, and truncated. */
export interface DiskTornTail {
  record: number;
  dropped: number;
  bytes: number;
  reason: DiskRecordFault;
}

export interface Corruption {
  page: number;
  /** Byte offset within the page of the first differing 8-byte word. */
  offset: number;
  /** The expected and found 8-byte words, 16 hex digits each. */
  expected: string;
  got: string;
}

export interface ConsoleScan {
  /** How many times /init reported a successful boot (more than 1 means the guest rebooted). */
  boots: number;
  heartbeats: Heartbeat[];
  corruptions: Corruption[];
  /** Exit statuses reported by /init for workloads that ended. */
  workloadExits: number[];
  /** diskverify's start-up verdicts, one per boot of a diskverify guest. */
  diskVerdicts: DiskVerdict[];
  diskTornTails: DiskTornTail[];
}

// Unanchored at the start (a kernel message may share the line), anchored at the end so a
// truncated line never parses as a smaller number.
const MEMVERIFY_RE =
  /(?:^|\s)memverify: heartbeat seq=(\d+) pages=(\d+) digest=([0-9a-f]{16}) maxstall_us=(\d+) corrupt=(\d+)\s*$/;
const DIRTY_RE = /(?:^|\s)dirty: heartbeat seq=(\d+) updates=(\d+) rate=(\d+) maxstall_us=(\d+)\s*$/;
const IDLE_RE = /(?:^|\s)idle: heartbeat seq=(\d+)\s*$/;
const DISK_SYNCED_RE = /(?:^|\s)diskverify: synced seq=(\d+) fsync_us=(\d+) maxstall_us=(\d+)\s*$/;
const FAULT = '(zero|magic|seq|checksum|chain|partial)';
const DISK_OK_RE = /(?:^|\s)diskverify: verify ok records=(\d+)\s*$/;
const DISK_FAILED_RE = new RegExp(
  `(?:^|\\s)diskverify: verify FAILED record=(\\d+) reason=${FAULT} valid=(\\d+) records=(\\d+)\\s*$`,
);
const DISK_TORN_RE = new RegExp(
  `(?:^|\\s)diskverify: torn tail truncated record=(\\d+) dropped=(\\d+) bytes=(\\d+) reason=${FAULT}\\s*$`,
);
const CORRUPT_RE =
  /(?:^|\s)memverify: CORRUPT page=(\d+) offset=(\d+) expected=([0-9a-f]{16}) got=([0-9a-f]{16})\s*$/;

function num(text: string | undefined): number {
  return Number(text);
}

export function parseHeartbeat(line: string): Heartbeat | null {
  let m = MEMVERIFY_RE.exec(line);
  if (m) {
    return {
      kind: 'memverify',
      seq: num(m[1]),
      pages: num(m[2]),
      digest: m[3] ?? '',
      maxStallUs: num(m[4]),
      corrupt: num(m[5]),
    };
  }
  m = DIRTY_RE.exec(line);
  if (m) {
    return { kind: 'dirty', seq: num(m[1]), updates: num(m[2]), rate: num(m[3]), maxStallUs: num(m[4]) };
  }
  m = IDLE_RE.exec(line);
  if (m) return { kind: 'idle', seq: num(m[1]) };
  m = DISK_SYNCED_RE.exec(line);
  if (m) return { kind: 'diskverify', seq: num(m[1]), fsyncUs: num(m[2]), maxStallUs: num(m[3]) };
  return null;
}

export function parseDiskVerdict(line: string): DiskVerdict | null {
  let m = DISK_OK_RE.exec(line);
  if (m) return { ok: true, records: num(m[1]) };
  m = DISK_FAILED_RE.exec(line);
  if (m) {
    const reason = m[2] as DiskRecordFault;
    return { ok: false, record: num(m[1]), reason, valid: num(m[3]), records: num(m[4]) };
  }
  return null;
}

export function parseDiskTornTail(line: string): DiskTornTail | null {
  const m = DISK_TORN_RE.exec(line);
  if (!m) return null;
  return { record: num(m[1]), dropped: num(m[2]), bytes: num(m[3]), reason: m[4] as DiskRecordFault };
}

export function parseCorruption(line: string): Corruption | null {
  const m = CORRUPT_RE.exec(line);
  if (!m) return null;
  return { page: num(m[1]), offset: num(m[2]), expected: m[3] ?? '', got: m[4] ?? '' };
}

/**
 * Scans a whole console log. A final line without a newline may still be being written,
 * so it is ignored.
 */
export function scanConsole(text: string): ConsoleScan {
  const result: ConsoleScan = {
    boots: 0,
    heartbeats: [],
    corruptions: [],
    workloadExits: [],
    diskVerdicts: [],
    diskTornTails: [],
  };
  const lines = text.split('\n');
  lines.pop(); // "" after a final newline, or an incomplete line
  for (const line of lines) {
    if (line.includes(BOOT_OK_PREFIX)) {
      result.boots++;
      continue;
    }
    const hb = parseHeartbeat(line);
    if (hb) {
      result.heartbeats.push(hb);
      continue;
    }
    const corruption = parseCorruption(line);
    if (corruption) {
      result.corruptions.push(corruption);
      continue;
    }
    const verdict = parseDiskVerdict(line);
    if (verdict) {
      result.diskVerdicts.push(verdict);
      continue;
    }
    const torn = parseDiskTornTail(line);
    if (torn) {
      result.diskTornTails.push(torn);
      continue;
    }
    const exit = /tlc-guest: workload exited status=(\d+)\s*$/.exec(line);
    if (exit) result.workloadExits.push(num(exit[1]));
  }
  return result;
}
