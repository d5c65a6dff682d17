/**
 * The memory server's storage: what it holds of each checkpoint (its "shard"), in memory while it
 * is being received and on local disk (layout.ts) after. Operations mirror the protocol's requests;
 * they validate every client-supplied name (layout.ts) and throw Refusal for the peer's mistakes.
 * Puts are synchronous up to the hand-off to the background writer, so a FLUSH that follows puts
 * on the same connection always waits for them.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { errorText, isErrnoCode } from '../core/errors.js';
import { type ProcessIdentity, identify, isAlive } from '../vm/process.js';
import { Refusal } from './errors.js';
import {
  Layout,
  checkBlock,
  checkIndex,
  checkName,
  ckptFiles,
  blockFromDir,
  decodeObject,
  type StoredObject,
} from './layout.js';
import type { CheckpointIndex, CheckpointInfo, CommitExpectation, FlushResult } from './messages.js';
import type { BlobRecord, ExtentRecord, PagesRecord } from './protocol.js';
import { Budget, DiskWriter } from './writer.js';

export interface ShardStoreOptions {
  dataDir: string;
  /** Copy each committed checkpoint here in the background (a shared or parallel file system). */
  flushTo?: string;
  log?: (line: string) => void;
}

interface CommitRecord {
  format: 1;
  id: string;
  committedAt: string;
  blocks: Record<string, number>;
  blobs: string[];
  bytes: number;
}

export class ShardStore {
  readonly layout: Layout;
  readonly serverId: string;
  private readonly writer: DiskWriter;
  private readonly log: (line: string) => void;
  private readonly flushRoot: string | undefined;
  /** Block directories already created, per pending checkpoint (saves a mkdir per put). */
  private readonly made = new Map<string, Set<string>>();
  private readonly committing = new Set<string>();
  private flushChain: Promise<void> = Promise.resolve();
  private readonly flushing = new Map<string, Promise<void>>();

  private constructor(opts: ShardStoreOptions, serverId: string) {
    this.layout = new Layout(opts.dataDir);
    this.serverId = serverId;
    this.log = opts.log ?? (() => {});
    this.writer = new DiskWriter(4, this.log);
    this.flushRoot = opts.flushTo ? path.join(path.resolve(opts.flushTo), serverId) : undefined;
  }

  /**
   * Opens (creating) the data directory. Leftovers in pending/ are checkpoints a crash interrupted
   * before commit: nobody can finish them (the client's session is gone), so they are discarded.
   */
  static open(opts: ShardStoreOptions): ShardStore {
    const layout = new Layout(opts.dataDir);
    fs.mkdirSync(layout.pending, { recursive: true, mode: 0o700 });
    fs.mkdirSync(layout.committed, { recursive: true, mode: 0o700 });
    // Before anything is discarded: a second server on the same directory would throw away the
    // first one's uploads in progress.
    lockDataDir(layout.root);
    const idFile = path.join(layout.root, 'server-id');
    let id: string;
    try {
      id = fs.readFileSync(idFile, 'utf8').trim();
    } catch (err) {
      if (!isErrnoCode(err, 'ENOENT')) throw err;
      id = `ms-${randomBytes(6).toString('hex')}`;
      fs.writeFileSync(idFile, id + '\n', { mode: 0o600 });
    }
    if (!/^ms-[0-9a-f]{12}$/.test(id)) throw new Error(`${idFile} does not hold a server id`);
    const store = new ShardStore(opts, id);
    for (const entry of fs.readdirSync(layout.pending)) {
      fs.rmSync(path.join(layout.pending, entry), { recursive: true, force: true });
      store.log(`discarded uncommitted checkpoint ${entry} (left by an earlier run)`);
    }
    for (const entry of fs.readdirSync(layout.committed))
      if (entry.startsWith('.'))
        fs.rmSync(path.join(layout.committed, entry), { recursive: true, force: true });
    if (store.flushRoot) fs.mkdirSync(store.flushRoot, { recursive: true, mode: 0o700 });
    return store;
  }

  /** Starts (or rejoins) receiving a checkpoint. Idempotent, so several connections may share it. */
  begin(ckpt: string): void {
    const dir = this.layout.pendingDir(ckpt);
    if (fs.existsSync(this.layout.committedDir(ckpt)))
      throw new Refusal('exists', `checkpoint ${ckpt} is already committed here`);
    fs.mkdirSync(ckptFiles.extents(dir), { recursive: true, mode: 0o700 });
    fs.mkdirSync(ckptFiles.blobs(dir), { recursive: true, mode: 0o700 });
    if (!this.made.has(ckpt)) this.made.set(ckpt, new Set());
  }

  /** Queues an extent for writing; a later put of the same extent replaces it. */
  putExtent(r: ExtentRecord, budget: Budget): void {
    const dir = this.begun(r.ckpt);
    const block = checkBlock(r.block);
    checkIndex(r.index);
    verifySum(r.data, r.sha256, `extent ${r.block}[${r.index}]`);
    const made = this.made.get(r.ckpt) as Set<string>;
    if (!made.has(block)) {
      fs.mkdirSync(ckptFiles.blockDir(dir, block), { recursive: true, mode: 0o700 });
      made.add(block);
    }
    const file = this.layout.inside(ckptFiles.extent(dir, block, r.index));
    this.writer.write(file, r.offset, r.data, r.sha256, budget, dir);
  }

  /** Patches pages of an extent sent before (pre-copy re-sends); the runs' checksum is verified first. */
  putPages(r: PagesRecord, budget: Budget): void {
    const dir = this.begun(r.ckpt);
    const block = checkBlock(r.block);
    checkIndex(r.index);
    const hash = createHash('sha256');
    for (const run of r.runs) hash.update(run.data);
    if (!hash.digest().equals(r.sha256))
      throw new Refusal('corrupt', `pages of extent ${r.block}[${r.index}] arrived with a wrong checksum`);
    if (!this.made.get(r.ckpt)?.has(block))
      throw new Refusal('not-found', `pages for block ${r.block}, of which no extent was sent`);
    const file = this.layout.inside(ckptFiles.extent(dir, block, r.index));
    this.writer.patch(file, r.runs, budget, dir);
  }

  putBlob(r: BlobRecord, budget: Budget): void {
    const dir = this.begun(r.ckpt);
    const file = this.layout.inside(ckptFiles.blob(dir, checkName(r.name, 'blob name')));
    verifySum(r.data, r.sha256, `blob ${r.name}`);
    this.writer.write(file, 0, r.data, r.sha256, budget, dir);
  }

  /** Resolves once everything received for `ckpt` is on disk and fsynced, directories included. */
  async flush(ckpt: string): Promise<FlushResult> {
    const dir = this.layout.pendingDir(ckpt);
    if (!fs.existsSync(dir)) throw new Refusal('not-found', `checkpoint ${ckpt} is not being received here`);
    await this.writer.idle(dir + path.sep);
    const failure = this.writer.takeFailure(dir);
    if (failure) throw new Refusal('internal', failure);
    const index = await readIndex(dir);
    let bytes = 0;
    for (const [block, indices] of Object.entries(index.blocks)) {
      const bdir = ckptFiles.blockDir(dir, block);
      for (const k of indices) bytes += (await fs.promises.stat(path.join(bdir, String(k)))).size;
      await fsyncDir(bdir);
    }
    await fsyncDir(ckptFiles.extents(dir));
    await fsyncDir(ckptFiles.blobs(dir));
    await fsyncDir(dir);
    const extents = Object.values(index.blocks).reduce((n, l) => n + l.length, 0);
    return { extents, blobs: index.blobs.length, bytes };
  }

  /**
   * The first phase of a commit across servers: flush, then check the client's expectation. Nothing
   * becomes visible; a ServerSet commits only once every server has prepared, so a checkpoint
   * some server cannot complete is listed nowhere.
   */
  async prepare(ckpt: string, expect: CommitExpectation | undefined): Promise<FlushResult> {
    const flushed = await this.flush(ckpt);
    const missing = missingFrom(await readIndex(this.layout.pendingDir(ckpt)), expect);
    if (missing) throw new Refusal('incomplete', `checkpoint ${ckpt} is incomplete here: ${missing}`);
    return flushed;
  }

  /**
   * Makes a received checkpoint durable and visible at once: flush, check the client's expectation,
   * write commit.json, rename pending/<id> to committed/<id>, fsync both parents. A checkpoint
   * missing any expected extent or blob stays pending and the commit is refused.
   */
  async commit(ckpt: string, expect: CommitExpectation | undefined): Promise<CheckpointInfo> {
    const dir = this.layout.pendingDir(ckpt);
    const target = this.layout.committedDir(ckpt);
    if (this.committing.has(ckpt))
      throw new Refusal('exists', `checkpoint ${ckpt} is being committed already`);
    this.committing.add(ckpt);
    try {
      if (fs.existsSync(target)) throw new Refusal('exists', `checkpoint ${ckpt} is already committed here`);
      const flushed = await this.flush(ckpt);
      const index = await readIndex(dir);
      const missing = missingFrom(index, expect);
      if (missing) throw new Refusal('incomplete', `checkpoint ${ckpt} is incomplete here: ${missing}`);
      const record: CommitRecord = {
        format: 1,
        id: ckpt,
        committedAt: new Date().toISOString(),
        blocks: Object.fromEntries(Object.entries(index.blocks).map(([b, l]) => [b, l.length])),
        blobs: index.blobs,
        bytes: flushed.bytes,
      };
      await writeDurable(ckptFiles.commit(dir), JSON.stringify(record, null, 2) + '\n');
      await fsyncDir(dir);
      await fs.promises.rename(dir, target);
      await fsyncDir(this.layout.committed);
      await fsyncDir(this.layout.pending);
      this.made.delete(ckpt);
      this.scheduleFlushTo(ckpt, target);
      return { ...record, where: 'local' };
    } finally {
      this.committing.delete(ckpt);
    }
  }

  async list(): Promise<CheckpointInfo[]> {
    const out = new Map<string, CheckpointInfo>();
    const scan = async (root: string, where: 'local' | 'flushed'): Promise<void> => {
      let entries: string[];
      try {
        entries = await fs.promises.readdir(root);
      } catch (err) {
        if (isErrnoCode(err, 'ENOENT')) return;
        throw err;
      }
      for (const id of entries) {
        if (out.has(id) || !NAME_OK(id)) continue;
        const rec = await readCommit(path.join(root, id));
        if (rec) out.set(id, { ...rec, where });
      }
    };
    await scan(this.layout.committed, 'local');
    if (this.flushRoot) await scan(this.flushRoot, 'flushed');
    return [...out.values()].sort(
      (a, b) => a.committedAt.localeCompare(b.committedAt) || a.id.localeCompare(b.id),
    );
  }

  async index(ckpt: string): Promise<CheckpointIndex> {
    return readIndex(await this.locate(ckpt));
  }

  async getExtent(ckpt: string, block: string, index: number): Promise<StoredObject> {
    const dir = await this.locate(ckpt);
    const file = ckptFiles.extent(dir, checkBlock(block), checkIndex(index));
    return decodeObject(await readStored(file, `extent ${block}[${index}] of ${ckpt}`), file);
  }

  async getBlob(ckpt: string, name: string): Promise<StoredObject> {
    const dir = await this.locate(ckpt);
    const file = ckptFiles.blob(dir, checkName(name, 'blob name'));
    return decodeObject(await readStored(file, `blob ${name} of ${ckpt}`), file);
  }

  /** Removes every copy of `ckpt` this server has: pending, committed and flushed. */
  async remove(ckpt: string): Promise<boolean> {
    const pending = this.layout.pendingDir(ckpt);
    const committed = this.layout.committedDir(ckpt);
    await this.writer.idle(pending + path.sep);
    this.writer.takeFailure(pending);
    this.made.delete(ckpt);
    await this.flushing.get(ckpt);
    let removed = false;
    for (const dir of [pending, committed, ...(this.flushRoot ? [path.join(this.flushRoot, ckpt)] : [])]) {
      // Renamed away first, so a crash mid-removal never leaves half a committed checkpoint listed.
      const trash = path.join(path.dirname(dir), `.rm-${ckpt}-${randomBytes(4).toString('hex')}`);
      try {
        await fs.promises.rename(dir, trash);
      } catch (err) {
        if (isErrnoCode(err, 'ENOENT')) continue;
        throw err;
      }
      removed = true;
      await fsyncDir(path.dirname(dir));
      await fs.promises.rm(trash, { recursive: true, force: true });
    }
    return removed;
  }

  /** Waits for queued disk writes and flush-to copies (shutdown: nothing received is dropped). */
  async close(): Promise<void> {
    await this.writer.idle();
    await this.flushChain;
    unlockDataDir(this.layout.root);
  }

  private begun(ckpt: string): string {
    const dir = this.layout.pendingDir(ckpt);
    if (!this.made.has(ckpt))
      throw new Refusal('not-found', `checkpoint ${ckpt} was not begun on this server`);
    // A put racing the commit could miss the rename and be lost without anyone noticing.
    if (this.committing.has(ckpt))
      throw new Refusal('exists', `checkpoint ${ckpt} is being committed: no more puts`);
    return dir;
  }

  /** Where a committed checkpoint's files are: the local copy, else the flushed one. */
  private async locate(ckpt: string): Promise<string> {
    const local = this.layout.committedDir(ckpt);
    if (await readCommit(local)) return local;
    if (this.flushRoot) {
      const flushed = path.join(this.flushRoot, checkName(ckpt, 'checkpoint id'));
      if (await readCommit(flushed)) return flushed;
    }
    throw new Refusal('not-found', `no committed checkpoint ${ckpt} here`);
  }

  private scheduleFlushTo(ckpt: string, src: string): void {
    const root = this.flushRoot;
    if (!root) return;
    const job = this.flushChain.then(async () => {
      const started = Date.now();
      try {
        await copyDurable(src, root, ckpt);
        this.log(`flushed checkpoint ${ckpt} to ${path.join(root, ckpt)} in ${Date.now() - started} ms`);
      } catch (err) {
        this.log(`cannot flush checkpoint ${ckpt} to ${root}: ${errorText(err)}`);
      }
    });
    this.flushChain = job;
    this.flushing.set(ckpt, job);
    void job.then(() => {
      if (this.flushing.get(ckpt) === job) this.flushing.delete(ckpt);
    });
  }
}

const LOCK_FILE = 'server.lock';

/** Claims the data directory for this process (pid and start time, so a reused pid is no owner). */
function lockDataDir(root: string): void {
  const file = path.join(root, LOCK_FILE);
  const me = identify(process.pid);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(file, JSON.stringify(me) + '\n', { flag: 'wx', mode: 0o600 });
      return;
    } catch (err) {
      if (!isErrnoCode(err, 'EEXIST')) throw err;
    }
    let owner: ProcessIdentity | undefined;
    try {
      owner = JSON.parse(fs.readFileSync(file, 'utf8')) as ProcessIdentity;
    } catch {
      owner = undefined;
    }
    if (owner && typeof owner.pid === 'number' && isAlive(owner))
      throw new Error(`data directory ${root} is in use by another memory server (pid ${owner.pid})`);
    fs.rmSync(file, { force: true }); // left by a server that died
  }
  throw new Error(`cannot lock data directory ${root}`);
}

function unlockDataDir(root: string): void {
  const file = path.join(root, LOCK_FILE);
  try {
    const owner = JSON.parse(fs.readFileSync(file, 'utf8')) as ProcessIdentity;
    if (owner.pid === process.pid) fs.rmSync(file, { force: true });
  } catch {
    // already gone
  }
}

function NAME_OK(id: string): boolean {
  try {
    checkName(id, 'checkpoint id');
    return true;
  } catch {
    return false;
  }
}

function verifySum(data: Buffer, sha256: Buffer, what: string): void {
  const got = createHash('sha256').update(data).digest();
  if (!got.equals(sha256)) throw new Refusal('corrupt', `${what} arrived with a wrong checksum`);
}

async function readStored(file: string, what: string): Promise<Buffer> {
  try {
    return await fs.promises.readFile(file);
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) throw new Refusal('not-found', `no ${what} here`);
    throw err;
  }
}

async function readCommit(dir: string): Promise<CommitRecord | undefined> {
  try {
    const rec = JSON.parse(await fs.promises.readFile(ckptFiles.commit(dir), 'utf8')) as CommitRecord;
    return rec.format === 1 && typeof rec.id === 'string' ? rec : undefined;
  } catch {
    return undefined;
  }
}

async function readIndex(dir: string): Promise<CheckpointIndex> {
  const blocks: Record<string, number[]> = {};
  for (const bdir of await fs.promises.readdir(ckptFiles.extents(dir))) {
    const block = blockFromDir(bdir);
    if (block === undefined) continue;
    const indices: number[] = [];
    for (const f of await fs.promises.readdir(path.join(ckptFiles.extents(dir), bdir)))
      if (/^\d+$/.test(f)) indices.push(Number(f));
    blocks[block] = indices.sort((a, b) => a - b);
  }
  const blobs = (await fs.promises.readdir(ckptFiles.blobs(dir))).filter(NAME_OK).sort();
  return { blocks, blobs };
}

/** What `expect` lists that `index` lacks, in words (a few examples), or undefined if nothing. */
export function missingFrom(
  index: CheckpointIndex,
  expect: CommitExpectation | undefined,
): string | undefined {
  const parts: string[] = [];
  for (const [block, wanted] of Object.entries(expect?.extents ?? {})) {
    const have = new Set(index.blocks[block] ?? []);
    const lacking = wanted.filter((k) => !have.has(k));
    if (lacking.length > 0)
      parts.push(
        `block ${block} lacks ${lacking.length} extent(s) (${lacking.slice(0, 5).join(', ')}${lacking.length > 5 ? ', ...' : ''})`,
      );
  }
  const blobs = new Set(index.blobs);
  const lackingBlobs = (expect?.blobs ?? []).filter((b) => !blobs.has(b));
  if (lackingBlobs.length > 0) parts.push(`blob(s) ${lackingBlobs.join(', ')} missing`);
  return parts.length > 0 ? parts.join('; ') : undefined;
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.promises.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function writeDurable(file: string, data: string | Buffer): Promise<void> {
  const fh = await fs.promises.open(file, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Copies `src` to `<root>/<ckpt>` via a temporary name: fsync every file and directory, rename, fsync root. */
async function copyDurable(src: string, root: string, ckpt: string): Promise<void> {
  const tmp = path.join(root, `.${ckpt}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const copyTree = async (from: string, to: string): Promise<void> => {
    await fs.promises.mkdir(to, { mode: 0o700 });
    for (const entry of await fs.promises.readdir(from, { withFileTypes: true })) {
      const a = path.join(from, entry.name);
      const b = path.join(to, entry.name);
      if (entry.isDirectory()) await copyTree(a, b);
      else if (entry.isFile()) {
        await fs.promises.copyFile(a, b);
        const fh = await fs.promises.open(b, 'r+');
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
      }
    }
    await fsyncDir(to);
  };
  try {
    await copyTree(src, tmp);
    await fs.promises.rm(path.join(root, ckpt), { recursive: true, force: true });
    await fs.promises.rename(tmp, path.join(root, ckpt));
    await fsyncDir(root);
  } catch (err) {
    await fs.promises.rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
