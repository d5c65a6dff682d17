import fs from 'node:fs';
import { CheckpointError, errorText } from '../core/errors.js';
import { isAlive, type ProcessIdentity } from './process.js';
import type { VmSpec } from './spec.js';

/** The name QEMU 7.2 gives the memfd of every `memory-backend-memfd` (`qemu_memfd_create`). */
const MEMFD_NAME = '/memfd:memory-backend-memfd';
/** How /proc shows a memfd, which has no directory entry. */
const DELETED_SUFFIX = ' (deleted)';

/** One line of /proc/<pid>/maps. */
export interface MapsEntry {
  start: number;
  end: number;
  /** File offset of `start`. */
  offset: number;
  /** `major:minor` in hex, as the kernel prints it. */
  dev: string;
  inode: bigint;
  /** Path, `/memfd:<name> (deleted)`, `[heap]`, ...; empty for anonymous memory. */
  name: string;
}

/** What guest RAM is mapped from, as /proc/<pid>/maps names it. */
export type RamBacking = { kind: 'memfd' } | { kind: 'file'; path: string };

/** The one mapping of guest RAM: its file's inode and where it is mapped. */
export interface RamMapping {
  dev: string;
  inode: bigint;
  start: number;
}

//  address                  perms offset     dev                    inode  name
const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)(?: +(.*))?$/;

/** Parses /proc/<pid>/maps; skips lines it does not understand and addresses beyond 2^53. */
export function parseMaps(text: string): MapsEntry[] {
  const entries: MapsEntry[] = [];
  for (const line of text.split('\n')) {
    const m = MAPS_LINE.exec(line);
    if (!m) continue;
    const start = parseInt(m[1] as string, 16);
    const end = parseInt(m[2] as string, 16);
    const offset = parseInt(m[3] as string, 16);
    if (!Number.isSafeInteger(end) || !Number.isSafeInteger(offset)) continue;
    entries.push({
      start,
      end,
      offset,
      dev: m[4] as string,
      inode: BigInt(m[5] as string),
      name: m[6] ?? '',
    });
  }
  return entries;
}

function describeBacking(backing: RamBacking): string {
  return backing.kind === 'memfd' ? `memfd ${MEMFD_NAME}` : `file ${backing.path}`;
}

function namesBacking(name: string, backing: RamBacking): boolean {
  if (backing.kind === 'file') return name === backing.path;
  return name === MEMFD_NAME || name === MEMFD_NAME + DELETED_SUFFIX;
}

/**
 * Finds the mapping of guest RAM in a QEMU process's maps: mapped from offset 0, exactly
 * `length` bytes long, named like the backend. QEMU may map one file more than once; what counts
 * is the number of distinct files (device and inode). Refuses, with a reason, unless exactly one
 * remains: a look-alike (another memory backend of the same size) must never be read as guest RAM.
 */
export function findRamMapping(
  maps: string,
  length: number,
  backing: RamBacking,
): { mapping: RamMapping } | { reason: string } {
  const found = new Map<string, RamMapping>();
  for (const e of parseMaps(maps)) {
    if (e.offset !== 0 || e.end - e.start !== length || !namesBacking(e.name, backing)) continue;
    const key = `${e.dev}/${e.inode}`;
    if (!found.has(key)) found.set(key, { dev: e.dev, inode: e.inode, start: e.start });
  }
  const what = describeBacking(backing);
  const [first, ...others] = found.values();
  if (!first) return { reason: `no mapping of ${what} with exactly ${length} bytes from offset 0` };
  if (others.length > 0) {
    const inodes = [first, ...others].map((m) => `${m.dev}/${m.inode}`).join(', ');
    return {
      reason: `${found.size} distinct ${what} mappings of exactly ${length} bytes (dev/inode ${inodes}); cannot tell which is guest RAM`,
    };
  }
  return { mapping: first };
}

/** GuestRam.open refused: `reason` says why, for the caller to print. */
export class GuestRamError extends CheckpointError {
  readonly reason: string;
  constructor(vm: string, reason: string, options?: { cause?: unknown }) {
    super(
      `Cannot read the guest RAM of "${vm}" for the TCG fix-up: ${reason}. ` +
        'Use --mode cow (consistent on TCG) or --mode stop',
      options,
    );
    this.reason = reason;
  }
}

/**
 * Read access to a running QEMU's guest RAM (`ram0`). Possible for memfd and file backends,
 * whose mappings carry a name in /proc/<pid>/maps; anonymous RAM (`memory-backend-ram`) cannot
 * be told apart reliably. The mapping is identified by name, offset 0, exact size and a single
 * inode (findRamMapping); a memfd is then read through QEMU's descriptor of that very inode, a
 * file mapping through /proc/<pid>/mem after checking the path still names that inode.
 */
export class GuestRam {
  private constructor(
    private readonly fd: number,
    private readonly base: number,
    readonly length: number,
  ) {}

  /** Throws GuestRamError when the guest RAM cannot be identified beyond doubt. */
  static open(id: ProcessIdentity, spec: VmSpec): GuestRam {
    const length = spec.memMiB * 1024 * 1024;
    const refuse = (reason: string, cause?: unknown): never => {
      throw new GuestRamError(spec.name, reason, cause === undefined ? undefined : { cause });
    };
    const memory = spec.memory;
    if (memory.kind === 'ram') {
      return refuse('it is anonymous memory (memory-backend-ram); a memfd or file memory backend is needed');
    }
    const backing: RamBacking = memory.kind === 'memfd' ? memory : { kind: 'file', path: memory.path };
    let maps: string;
    try {
      maps = fs.readFileSync(`/proc/${id.pid}/maps`, 'utf8');
    } catch (err) {
      return refuse(`cannot read /proc/${id.pid}/maps: ${errorText(err)}`, err);
    }
    if (!isAlive(id)) return refuse(`QEMU (pid ${id.pid}) is no longer running`);
    const found = findRamMapping(maps, length, backing);
    if ('reason' in found) return refuse(found.reason);
    const { inode, start } = found.mapping;
    if (backing.kind === 'memfd') {
      // A memfd is read fastest through its own descriptor (page cache, offset 0 = guest RAM
      // offset 0).
      const fd = openMemfd(id.pid, inode);
      return fd === undefined
        ? refuse(`QEMU (pid ${id.pid}) holds no descriptor of the memfd it maps (inode ${inode})`)
        : new GuestRam(fd, 0, length);
    }
    // A private file mapping's copied-on-write pages are visible only through /proc/<pid>/mem.
    let onDisk: bigint;
    try {
      onDisk = fs.statSync(backing.path, { bigint: true }).ino;
    } catch (err) {
      return refuse(`cannot stat ${backing.path}: ${errorText(err)}`, err);
    }
    if (onDisk !== inode) {
      return refuse(`${backing.path} is now inode ${onDisk}, QEMU maps inode ${inode}`);
    }
    return new GuestRam(fs.openSync(`/proc/${id.pid}/mem`, 'r'), start, length);
  }

  /** Reads `len` bytes at guest-RAM offset `offset` into `buf` (from 0). */
  read(buf: Buffer, offset: number, len: number): void {
    let got = 0;
    while (got < len) {
      const n = fs.readSync(this.fd, buf, got, len - got, this.base + offset + got);
      if (n <= 0) throw new Error(`short read of guest RAM at offset ${offset + got}`);
      got += n;
    }
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

/** Opens QEMU's descriptor of the memfd with `inode`, checked on the opened file itself. */
function openMemfd(pid: number, inode: bigint): number | undefined {
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const name of fds) {
    const link = `/proc/${pid}/fd/${name}`;
    let fd: number;
    try {
      if (!fs.readlinkSync(link).startsWith('/memfd:')) continue;
      fd = fs.openSync(link, 'r');
    } catch {
      continue; // closed meanwhile
    }
    let same = false;
    try {
      same = fs.fstatSync(fd, { bigint: true }).ino === inode;
    } finally {
      if (!same) fs.closeSync(fd);
    }
    if (same) return fd;
  }
  return undefined;
}
