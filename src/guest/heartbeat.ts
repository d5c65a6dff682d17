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

export type Heartbeat = MemverifyHeartbeat | DirtyHeartbeat | IdleHeartbeat;

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
}

// Unanchored at the start (a kernel message may share the line), anchored at the end so a
// truncated line never parses as a smaller number.
const MEMVERIFY_RE =
  /(?:^|\s)memverify: heartbeat seq=(\d+) pages=(\d+) digest=([0-9a-f]{16}) maxstall_us=(\d+) corrupt=(\d+)\s*$/;
const DIRTY_RE = /(?:^|\s)dirty: heartbeat seq=(\d+) updates=(\d+) rate=(\d+) maxstall_us=(\d+)\s*$/;
const IDLE_RE = /(?:^|\s)idle: heartbeat seq=(\d+)\s*$/;
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
  return null;
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
  const result: ConsoleScan = { boots: 0, heartbeats: [], corruptions: [], workloadExits: [] };
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
    const exit = /tlc-guest: workload exited status=(\d+)\s*$/.exec(line);
    if (exit) result.workloadExits.push(num(exit[1]));
  }
  return result;
}
