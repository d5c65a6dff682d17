import fs from 'node:fs';
import type { ProcessIdentity } from './process.js';
import type { VmSpec } from './spec.js';

/**
 * Read access to a running QEMU's guest RAM (`ram0`) through /proc/<pid>/mem, at the address
 * where QEMU mapped the RAM backend. Possible for memfd and file backends, whose mappings carry a
 * name in /proc/<pid>/maps; anonymous RAM (`memory-backend-ram`) cannot be told apart reliably.
 */
export class GuestRam {
  private constructor(
    private readonly fd: number,
    private readonly base: number,
    readonly length: number,
  ) {}

  static open(id: ProcessIdentity, spec: VmSpec): GuestRam | undefined {
    const length = spec.memMiB * 1024 * 1024;
    const wanted =
      spec.memory.kind === 'memfd'
        ? (name: string) => name.startsWith('/memfd:memory-backend-memfd')
        : spec.memory.kind === 'file'
          ? (name: string) => name === (spec.memory as { path: string }).path
          : undefined;
    if (!wanted) return undefined;
    let maps: string;
    try {
      maps = fs.readFileSync(`/proc/${id.pid}/maps`, 'utf8');
    } catch {
      return undefined;
    }
    for (const line of maps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+\s+(.*)$/.exec(line);
      if (!m?.[1] || !m[2] || !m[4]) continue;
      const start = parseInt(m[1], 16);
      const end = parseInt(m[2], 16);
      if (parseInt(m[3] ?? '1', 16) !== 0 || end - start < length || !wanted(m[4])) continue;
      // A memfd is read fastest through its own descriptor (page cache, offset 0 = guest RAM
      // offset 0); a private file mapping's copied-on-write pages only through /proc/<pid>/mem.
      const memfd = spec.memory.kind === 'memfd' ? findMemfd(id.pid) : undefined;
      if (memfd) return new GuestRam(fs.openSync(memfd, 'r'), 0, length);
      const fd = fs.openSync(`/proc/${id.pid}/mem`, 'r');
      return new GuestRam(fd, start, length);
    }
    return undefined;
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

function findMemfd(pid: number): string | undefined {
  let fds: string[];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const fd of fds) {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/memfd:memory-backend-memfd'))
        return `/proc/${pid}/fd/${fd}`;
    } catch {
      // closed meanwhile
    }
  }
  return undefined;
}
