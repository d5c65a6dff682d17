import fs from 'node:fs';
import path from 'node:path';
import { TlcError } from '../core/errors.js';
import { CONFIG_FILE, sha256Hex } from './manifest.js';
import type { StoredCheckpoint } from './store.js';
import { SUMS_CHUNK_BYTES } from './manifest.js';
import { verifyImage } from './sums.js';

export interface VerifyReport {
  id: string;
  ok: boolean;
  /** One line per problem: which file, which byte range. */
  problems: string[];
  bytesChecked: number;
}

/**
 * Checks a checkpoint's files. `full` re-hashes every RAM image chunk against its sums (reads the
 * whole checkpoint); without it only sizes and the small files' checksums are checked.
 */
export function verifyCheckpoint(ckpt: StoredCheckpoint, full: boolean): VerifyReport {
  const m = ckpt.manifest;
  const problems: string[] = [];
  let bytesChecked = 0;
  const checkSmall = (file: string, sha: string): void => {
    const p = path.join(ckpt.dir, file);
    let data: Buffer;
    try {
      data = fs.readFileSync(p);
    } catch {
      problems.push(`${file}: missing`);
      return;
    }
    bytesChecked += data.length;
    if (sha256Hex(data) !== sha) problems.push(`${file}: checksum mismatch`);
  };
  checkSmall(CONFIG_FILE, m.configSha256);
  checkSmall(m.device.file, m.device.sha256);
  for (const block of m.blocks) {
    checkSmall(block.sumsFile, block.sumsSha256);
    const image = path.join(ckpt.dir, block.file);
    let size = -1;
    try {
      size = fs.statSync(image).size;
    } catch {
      problems.push(`${block.file} (${block.name}): missing`);
      continue;
    }
    if (size !== block.usedLength) {
      problems.push(`${block.file} (${block.name}): ${size} bytes, expected ${block.usedLength}`);
      continue;
    }
    if (!full) continue;
    try {
      for (const chunk of verifyImage(image, path.join(ckpt.dir, block.sumsFile), block.usedLength)) {
        const from = chunk * SUMS_CHUNK_BYTES;
        problems.push(
          `${block.file} (${block.name}): bytes ${from}-${from + SUMS_CHUNK_BYTES - 1} do not match their checksum`,
        );
      }
      bytesChecked += block.usedLength;
    } catch (err) {
      problems.push(err instanceof TlcError ? err.message : String(err));
    }
  }
  return { id: ckpt.id, ok: problems.length === 0, problems, bytesChecked };
}

export function assertVerified(report: VerifyReport): void {
  if (!report.ok) {
    throw new TlcError(
      'E_CORRUPT',
      `Checkpoint ${report.id} is damaged: ${report.problems.slice(0, 3).join('; ')}`,
    );
  }
}
