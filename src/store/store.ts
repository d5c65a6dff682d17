import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PersistError, StoreError, TlcError, isErrnoCode } from '../core/errors.js';
import { fsyncDir } from '../core/fsutil.js';
import { PRIVATE_DIR_MODE, defaultStoreDir } from '../core/paths.js';
import { MANIFEST_FILE, type Manifest, openManifest } from './manifest.js';

const STAGING_PREFIX = '.tmp-';

export interface StoredCheckpoint {
  id: string;
  dir: string;
  manifest: Manifest;
}

/**
 * A directory of checkpoints. A checkpoint is built in `.tmp-<id>-<pid>` and becomes visible only
 * by an atomic rename once complete and fsynced; listing never shows a staging directory.
 */
export class CheckpointStore {
  readonly dir: string;

  constructor(dir?: string) {
    this.dir = path.resolve(dir ?? defaultStoreDir());
  }

  private ensure(): void {
    try {
      fs.mkdirSync(this.dir, { recursive: true, mode: PRIVATE_DIR_MODE });
    } catch (err) {
      throw new PersistError('create store directory', this.dir, err);
    }
  }

  newId(vmName: string): string {
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
    return `${vmName}-${stamp}-${randomBytes(2).toString('hex')}`;
  }

  /** Creates a private staging directory for checkpoint `id`, sweeping staging dirs of dead runs. */
  stage(id: string): string {
    this.ensure();
    this.sweepStale();
    const staging = path.join(this.dir, `${STAGING_PREFIX}${id}-${process.pid}`);
    try {
      fs.mkdirSync(staging, { mode: PRIVATE_DIR_MODE });
    } catch (err) {
      throw new PersistError('create', staging, err);
    }
    return staging;
  }

  /** Makes a complete staging directory visible as checkpoint `id`. */
  publish(staging: string, id: string): string {
    const final = path.join(this.dir, id);
    fsyncDir(staging);
    try {
      fs.renameSync(staging, final);
    } catch (err) {
      throw new PersistError('publish (rename)', final, err);
    }
    fsyncDir(this.dir);
    return final;
  }

  discard(staging: string): void {
    fs.rmSync(staging, { recursive: true, force: true });
  }

  private sweepStale(): void {
    for (const entry of safeReaddir(this.dir)) {
      if (!entry.startsWith(STAGING_PREFIX)) continue;
      const pid = Number(entry.slice(entry.lastIndexOf('-') + 1));
      if (Number.isInteger(pid) && pid > 0 && !pidAlive(pid)) {
        fs.rmSync(path.join(this.dir, entry), { recursive: true, force: true });
      }
    }
  }

  list(): StoredCheckpoint[] {
    const out: StoredCheckpoint[] = [];
    for (const entry of safeReaddir(this.dir)) {
      if (entry.startsWith('.')) continue;
      const dir = path.join(this.dir, entry);
      try {
        out.push({ id: entry, dir, manifest: readManifest(dir) });
      } catch {
        // not a checkpoint (or a damaged one: `tlc verify` names it)
      }
    }
    return out.sort((a, b) => a.manifest.createdAt.localeCompare(b.manifest.createdAt));
  }

  /** Finds a checkpoint by id, unique id prefix, or VM name (its newest checkpoint). */
  resolve(ref: string, opts: { byVmName?: boolean } = { byVmName: true }): StoredCheckpoint {
    const exact = path.join(this.dir, ref);
    if (!ref.startsWith('.') && !ref.includes('/') && fs.existsSync(path.join(exact, MANIFEST_FILE))) {
      return { id: ref, dir: exact, manifest: readManifest(exact) };
    }
    const all = this.list();
    const byPrefix = all.filter((c) => c.id.startsWith(ref));
    if (byPrefix.length === 1 && byPrefix[0]) return byPrefix[0];
    const byVm = opts.byVmName ? all.filter((c) => c.manifest.vm.name === ref) : [];
    const newest = byVm.at(-1);
    if (newest) return newest;
    if (byPrefix.length > 1)
      throw new TlcError('E_USAGE', `"${ref}" matches ${byPrefix.length} checkpoints; give more of the id`);
    throw new TlcError('E_NOT_FOUND', `No checkpoint "${ref}" in ${this.dir} (see: tlc ls)`);
  }

  remove(ref: string): StoredCheckpoint {
    const found = this.resolve(ref, { byVmName: false });
    // Rename first so a crash mid-delete never leaves a half-deleted checkpoint listed.
    const doomed = path.join(this.dir, `${STAGING_PREFIX}rm-${found.id}-${process.pid}`);
    fs.renameSync(found.dir, doomed);
    fs.rmSync(doomed, { recursive: true, force: true });
    return found;
  }
}

export function readManifest(dir: string): Manifest {
  const file = path.join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) throw new StoreError('E_NOT_FOUND', `${dir} has no ${MANIFEST_FILE}`);
    throw err;
  }
  return openManifest(text, file);
}

function safeReaddir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) return [];
    throw err;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return isErrnoCode(err, 'EPERM');
  }
}
