/**
 * Background writer: extents received over the network are acknowledged once buffered and written
 * to local disk here, off the network's critical path (the seeds' servers keep the checkpoint in
 * memory and save it while the VM runs on). Each file is written whole and fdatasync'ed; FLUSH then
 * only has to wait for the queue and fsync the directories.
 *
 * Pre-copy sends an extent again when its pages change. A whole extent queued again before its
 * write started replaces the queued one; pages (a patch) are copied into a queued extent, or queued
 * as a patch of the file when its write runs or is done. Either way the newest version always lands
 * last, and the stored checksum is recomputed after a patch. Every buffered byte is charged to the
 * connection that sent it (`Budget`) until written: the connection stops reading its socket while
 * over budget.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { OBJECT_FIELD, OBJECT_HEAD_BYTES, OBJECT_MAGIC, OBJECT_VERSION, encodeObjectHead } from './layout.js';
import type { PageRun } from './protocol.js';

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

interface Charge {
  budget: Budget;
  bytes: number;
}

type Job =
  | {
      kind: 'whole';
      offset: number;
      data: Buffer;
      /** The sender's checksum, or undefined once pages were copied in (recomputed at write). */
      sha256: Buffer | undefined;
      charges: Charge[];
      group: string;
    }
  | { kind: 'patch'; runs: PageRun[]; charges: Charge[]; group: string };

interface Entry {
  queued: Job | undefined;
  running: boolean;
}

function release(job: Job): void {
  for (const c of job.charges) c.budget.release(c.bytes);
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

  /** Queues a whole stored object (extent or blob); `group` is the checkpoint directory. */
  write(file: string, offset: number, data: Buffer, sha256: Buffer, budget: Budget, group: string): void {
    budget.charge(data.length);
    this.enqueue(file, {
      kind: 'whole',
      offset,
      data,
      sha256,
      charges: [{ budget, bytes: data.length }],
      group,
    });
  }

  /** Queues new contents for parts of an extent already sent. */
  patch(file: string, runs: PageRun[], budget: Budget, group: string): void {
    const entry = this.entries.get(file);
    const queued = entry?.queued;
    if (queued?.kind === 'whole') {
      // Not written yet: the pages go straight into the buffered extent.
      for (const run of runs) {
        if (run.at + run.data.length > queued.data.length) {
          this.fail(
            group,
            `cannot patch ${file}: run ${run.at}+${run.data.length} beyond the extent's ${queued.data.length} bytes`,
          );
          return;
        }
      }
      for (const run of runs) run.data.copy(queued.data, run.at);
      queued.sha256 = undefined;
      return;
    }
    const bytes = runs.reduce((n, r) => n + r.data.length, 0);
    budget.charge(bytes);
    if (queued?.kind === 'patch') {
      queued.runs.push(...runs);
      queued.charges.push({ budget, bytes });
      return;
    }
    this.enqueue(file, { kind: 'patch', runs: [...runs], charges: [{ budget, bytes }], group });
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

  private enqueue(file: string, job: Job): void {
    const entry = this.entries.get(file);
    if (!entry) {
      this.entries.set(file, { queued: job, running: false });
      this.queue.push(file);
    } else {
      const stale = entry.queued;
      entry.queued = job;
      // Without a stale job the entry is running: its completion queues this one.
      if (stale) release(stale);
    }
    this.pump();
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
        release(job);
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
      if (job.kind === 'whole') await writeWhole(file, job.offset, job.data, job.sha256);
      else await applyPatch(file, job.runs);
    } catch (err) {
      this.fail(job.group, `cannot write ${file}: ${(err as Error).message}`);
    }
  }

  private fail(group: string, text: string): void {
    if (!this.failures.has(group)) this.failures.set(group, text);
    this.log(text);
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

async function writeWhole(
  file: string,
  offset: number,
  data: Buffer,
  sha256: Buffer | undefined,
): Promise<void> {
  const sum = sha256 ?? createHash('sha256').update(data).digest();
  const fh = await fs.promises.open(file, 'w', 0o600);
  try {
    await fh.writev([encodeObjectHead(offset, data.length, sum), data]);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** Writes the runs into the stored extent, then recomputes its checksum from what is on disk. */
async function applyPatch(file: string, runs: PageRun[]): Promise<void> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(file, 'r+');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new Error('pages sent for an extent never sent whole');
    throw err;
  }
  try {
    const head = Buffer.alloc(OBJECT_HEAD_BYTES);
    await fh.read(head, 0, OBJECT_HEAD_BYTES, 0);
    if (
      head.readUInt32BE(OBJECT_FIELD.magic) !== OBJECT_MAGIC ||
      head.readUInt16BE(OBJECT_FIELD.version) !== OBJECT_VERSION
    )
      throw new Error('not a stored extent');
    const length = head.readUInt32BE(OBJECT_FIELD.length);
    for (const run of runs)
      if (run.at + run.data.length > length)
        throw new Error(`run ${run.at}+${run.data.length} beyond the extent's ${length} bytes`);
    for (const run of runs) await fh.write(run.data, 0, run.data.length, OBJECT_HEAD_BYTES + run.at);
    const data = Buffer.allocUnsafe(length);
    await fh.read(data, 0, length, OBJECT_HEAD_BYTES);
    createHash('sha256').update(data).digest().copy(head, OBJECT_FIELD.sha256);
    await fh.write(head, 0, OBJECT_HEAD_BYTES, 0);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}
