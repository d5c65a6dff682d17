/**
 * Background writer: extents received over the network are acknowledged once buffered and written
 * to local disk here, off the network's critical path (the seeds' servers keep the checkpoint in
 * memory and save it while the VM runs on). Each file is written whole and fdatasync'ed; FLUSH then
 * only has to wait for the queue and fsync the directories.
 *
 * A file queued again before its write started is replaced in the queue (pre-copy re-sends: only
 * the newest version is written); one queued while its write runs is written after it, so the
 * newest version always lands last. Every buffered byte is charged to the connection that sent it
 * (`Budget`) until written: the connection stops reading its socket while over budget.
 */
import fs from 'node:fs';

export class Budget {
  used = 0;
  constructor(
    readonly limit: number,
    private readonly onRelease: () => void,
  ) {}
  charge(n: number): void {
    this.used += n;
  }
  release(n: number): void {
    this.used -= n;
    this.onRelease();
  }
  get over(): boolean {
    return this.used > this.limit;
  }
}

interface Job {
  head: Buffer;
  data: Buffer;
  budget: Budget;
  /** The checkpoint directory a failure is reported against. */
  group: string;
}

interface Entry {
  queued: Job | undefined;
  running: boolean;
}

export class DiskWriter {
  private readonly entries = new Map<string, Entry>();
  private readonly queue: string[] = [];
  private active = 0;
  private waiters: Array<{ prefix: string; resolve: () => void }> = [];
  /** First write error per checkpoint directory, reported by the next FLUSH or COMMIT. */
  private readonly failures = new Map<string, string>();

  constructor(
    private readonly concurrency = 4,
    private readonly log: (line: string) => void = () => {},
  ) {}

  /** Files queued or being written, for all connections. */
  get bufferedFiles(): number {
    return this.entries.size;
  }

  write(file: string, head: Buffer, data: Buffer, budget: Budget, group: string): void {
    budget.charge(data.length);
    const job = { head, data, budget, group };
    const entry = this.entries.get(file);
    if (!entry) {
      this.entries.set(file, { queued: job, running: false });
      this.queue.push(file);
    } else {
      const stale = entry.queued;
      entry.queued = job;
      // Without a stale job the entry is running: its completion queues this one.
      if (stale) stale.budget.release(stale.data.length);
    }
    this.pump();
  }

  /** Resolves when no write under `prefix` (a directory with its trailing slash; '' = all) is queued or running. */
  idle(prefix = ''): Promise<void> {
    if (!this.busy(prefix)) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ prefix, resolve }));
  }

  /** The first write error in group `dir`, if any (and forgets it: the checkpoint is failed anyway). */
  takeFailure(dir: string): string | undefined {
    const f = this.failures.get(dir);
    this.failures.delete(dir);
    return f;
  }

  private busy(prefix: string): boolean {
    for (const file of this.entries.keys()) if (file.startsWith(prefix)) return true;
    return false;
  }

  private pump(): void {
    while (this.active < this.concurrency && this.queue.length > 0) {
      const file = this.queue.shift() as string;
      const entry = this.entries.get(file);
      if (!entry?.queued || entry.running) continue;
      const job = entry.queued;
      entry.queued = undefined;
      entry.running = true;
      this.active++;
      void this.run(file, job).finally(() => {
        this.active--;
        job.budget.release(job.data.length);
        entry.running = false;
        if (entry.queued) this.queue.push(file);
        else this.entries.delete(file);
        this.wake();
        this.pump();
      });
    }
  }

  private async run(file: string, job: Job): Promise<void> {
    try {
      const fh = await fs.promises.open(file, 'w', 0o600);
      try {
        await fh.writev([job.head, job.data]);
        await fh.datasync();
      } finally {
        await fh.close();
      }
    } catch (err) {
      const text = `cannot write ${file}: ${(err as Error).message}`;
      if (!this.failures.has(job.group)) this.failures.set(job.group, text);
      this.log(text);
    }
  }

  private wake(): void {
    if (this.waiters.length === 0) return;
    const still: typeof this.waiters = [];
    for (const w of this.waiters) {
      if (this.busy(w.prefix)) still.push(w);
      else w.resolve();
    }
    this.waiters = still;
  }
}
