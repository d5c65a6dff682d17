import fs from 'node:fs';
import path from 'node:path';
import { TlcError, errorText } from '../core/errors.js';
import { hashFile } from '../core/fsutil.js';
import { CONFIG_FILE, SUMS_CHUNK_BYTES, checkpointFilePath, sha256Hex } from './manifest.js';
import { type SignatureStatus, checkSignature } from './sign.js';
import type { StoredCheckpoint } from './store.js';
import { chunkCount, verifyImage } from './sums.js';
import { hashesFileBytes } from './page-hash.js';

export interface VerifyOptions {
  /** The signing key (`loadSigningKey`); without it a signed checkpoint is reported 'no-key'. */
  key?: Buffer;
  /** With a key: accept a checkpoint that has no signature (reported 'unsigned', not a problem). */
  allowUnsigned?: boolean;
}

export interface VerifyReport {
  id: string;
  ok: boolean;
  /** One line per problem: which file, which byte range. */
  problems: string[];
  bytesChecked: number;
  /** 'invalid': a MAC that does not match, or another key's signature (also listed in problems). */
  signature: SignatureStatus | 'invalid';
  /** The key id the manifest says it was signed with, when signed. */
  keyId?: string;
}

/** config.bin is the stream's configuration section: a few hundred bytes. */
const MAX_CONFIG_BYTES = 1024 * 1024;
/** Size of a sums file for a `length`-byte image (sums.ts: 16-byte header, 32 bytes per chunk). */
const sumsBytes = (length: number): number => 16 + 32 * chunkCount(length);

/**
 * Checks a checkpoint: its signature (policy in sign.ts), then its files. Every file must be a
 * regular file (a symlink could point anywhere) of the size the manifest says. `full` re-hashes
 * every RAM image chunk against its sums (reads the whole checkpoint); without it only sizes and
 * the small files' checksums are checked.
 */
export function verifyCheckpoint(
  ckpt: StoredCheckpoint,
  full: boolean,
  opts: VerifyOptions = {},
): VerifyReport {
  const m = ckpt.manifest;
  const problems: string[] = [];
  let bytesChecked = 0;

  let signature: VerifyReport['signature'];
  try {
    signature = checkSignature(m, opts.key);
  } catch (err) {
    signature = 'invalid';
    problems.push(err instanceof TlcError ? err.message : errorText(err));
  }
  if (signature === 'unsigned' && opts.key && !opts.allowUnsigned) {
    problems.push('not signed, and a signing key is configured (pass --allow-unsigned to accept it)');
  }

  /** Size of `file` if it is a regular file inside the checkpoint, else undefined (problem noted). */
  const regularFile = (file: string, label = file): number | undefined => {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(checkpointFilePath(ckpt.dir, file));
    } catch (err) {
      problems.push(err instanceof TlcError ? err.message : `${label}: missing`);
      return undefined;
    }
    if (!st.isFile()) {
      problems.push(`${label}: not a regular file${st.isSymbolicLink() ? ' (a symlink)' : ''}`);
      return undefined;
    }
    return st.size;
  };
  const checkSmall = (file: string, sha: string, size: { exact?: number; max?: number }): void => {
    const actual = regularFile(file);
    if (actual === undefined) return;
    if (
      (size.exact !== undefined && actual !== size.exact) ||
      (size.max !== undefined && actual > size.max)
    ) {
      problems.push(
        `${file}: ${actual} bytes, expected ${size.exact !== undefined ? size.exact : `at most ${size.max}`}`,
      );
      return;
    }
    const data = fs.readFileSync(path.join(ckpt.dir, file));
    bytesChecked += data.length;
    if (sha256Hex(data) !== sha) problems.push(`${file}: checksum mismatch`);
  };

  checkSmall(CONFIG_FILE, m.configSha256, { max: MAX_CONFIG_BYTES });
  checkSmall(m.device.file, m.device.sha256, { exact: m.device.bytes });
  for (const block of m.blocks) {
    checkSmall(block.sumsFile, block.sumsSha256, { exact: sumsBytes(block.usedLength) });
    if (block.hashesFile !== undefined && block.hashesSha256 !== undefined)
      checkSmall(block.hashesFile, block.hashesSha256, { exact: hashesFileBytes(block.usedLength) });
    if (block.deltaFile !== undefined && block.deltaSha256 !== undefined)
      checkSmall(block.deltaFile, block.deltaSha256, { exact: block.deltaBytes ?? 0 });
    const label = `${block.file} (${block.name})`;
    const size = regularFile(block.file, label);
    if (size === undefined) continue;
    if (size !== block.usedLength) {
      problems.push(`${label}: ${size} bytes, expected ${block.usedLength}`);
      continue;
    }
    if (!full) continue;
    try {
      const image = path.join(ckpt.dir, block.file);
      for (const chunk of verifyImage(image, path.join(ckpt.dir, block.sumsFile), block.usedLength)) {
        const from = chunk * SUMS_CHUNK_BYTES;
        problems.push(`${label}: bytes ${from}-${from + SUMS_CHUNK_BYTES - 1} do not match their checksum`);
      }
      bytesChecked += block.usedLength;
    } catch (err) {
      problems.push(err instanceof TlcError ? err.message : String(err));
    }
  }
  for (const disk of m.disks ?? []) {
    for (const layer of disk.layers) {
      const label = `${layer.file} (disk ${disk.device})`;
      const size = regularFile(layer.file, label);
      if (size === undefined) continue;
      if (size !== layer.bytes) {
        problems.push(`${label}: ${size} bytes, expected ${layer.bytes}`);
        continue;
      }
      if (!full) continue;
      if (hashFile(path.join(ckpt.dir, layer.file)).sha256 !== layer.sha256)
        problems.push(`${label}: checksum mismatch`);
      bytesChecked += size;
    }
  }
  return {
    id: ckpt.id,
    ok: problems.length === 0,
    problems,
    bytesChecked,
    signature,
    ...(m.signature ? { keyId: m.signature.keyId } : {}),
  };
}

/** Throws E_CORRUPT naming the first problems (damage, a bad or missing signature). */
export function assertVerified(report: VerifyReport): void {
  if (!report.ok) {
    throw new TlcError(
      'E_CORRUPT',
      `Checkpoint ${report.id} failed verification: ${report.problems.slice(0, 3).join('; ')}`,
    );
  }
}
