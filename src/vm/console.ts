import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

const POLL_MS = 25;

/**
 * Reads a serial-console log file line by line as QEMU appends to it. Polling (not fs.watch):
 * QEMU's file chardev writes small pieces and inotify on some filesystems misses them.
 */
export class ConsoleTail {
  private offset: number;
  private partial = '';
  private readonly chunk = Buffer.allocUnsafe(64 * 1024);

  constructor(
    readonly file: string,
    fromEnd = false,
  ) {
    this.offset = fromEnd ? fileSize(file) : 0;
  }

  /** Complete lines appended since the last call. */
  readLines(): string[] {
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch {
      return [];
    }
    try {
      let text = this.partial;
      for (;;) {
        const n = fs.readSync(fd, this.chunk, 0, this.chunk.length, this.offset);
        if (n <= 0) break;
        this.offset += n;
        text += this.chunk.toString('latin1', 0, n);
      }
      const lines = text.split('\n');
      this.partial = lines.pop() ?? '';
      return lines.map((l) => l.replace(/\r$/, ''));
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Resolves with the first new line matching `match`. Rejects with `onTimeout()`'s error, or with
   * `stillAlive()`'s error as soon as it returns one (the QEMU process died).
   */
  async waitFor(
    match: (line: string) => boolean,
    opts: { timeoutMs: number; check?: () => Error | undefined; onTimeout: () => Error },
  ): Promise<string> {
    const deadline = Date.now() + opts.timeoutMs;
    for (;;) {
      for (const line of this.readLines()) if (match(line)) return line;
      const dead = opts.check?.();
      if (dead) {
        for (const line of this.readLines()) if (match(line)) return line;
        throw dead;
      }
      if (Date.now() >= deadline) throw opts.onTimeout();
      await sleep(POLL_MS);
    }
  }
}

function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/** Sequence number of the newest workload heartbeat in a console log (reads only its tail). */
export function lastHeartbeatSeq(file: string): number | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const size = fs.fstatSync(fd).size;
    const len = Math.min(size, 64 * 1024);
    const buf = Buffer.alloc(len);
    fs.readSync(fd, buf, 0, len, size - len);
    const lines = buf.toString('latin1').split('\n');
    for (let i = lines.length - 1; i >= 0; i--) {
      const m = / heartbeat seq=(\d+)/.exec(lines[i] ?? '');
      if (m?.[1]) return Number(m[1]);
    }
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}
