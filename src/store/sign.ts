import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PersistError, TlcError, errorText, isErrnoCode } from '../core/errors.js';
import { fsyncDir } from '../core/fsutil.js';
import { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../core/paths.js';
import type { Manifest } from './manifest.js';

/**
 * Checkpoint signing: an HMAC-SHA256 over the manifest body with a per-user secret key.
 *
 * The body is everything in the manifest except `checksum` and `signature`, as canonical JSON
 * (object keys sorted, no whitespace). It already holds the SHA-256 of config.bin, of device.bin
 * and of every block's sums file, and each sums file holds the SHA-256 of every 1 MiB chunk of its
 * RAM image: so one MAC over the body authenticates every byte of the checkpoint.
 *
 * The manifest's plain SHA-256 `checksum` stays, as an integrity check only: anyone who can write
 * the store can recompute it. The MAC needs the key.
 *
 * Policy for callers (restore, `tlc verify`): when a key is configured or exists, a checkpoint
 * must be signed with it. A bad MAC or another key's signature is always refused (E_CORRUPT); an
 * unsigned checkpoint is refused unless the caller passes `allowUnsigned` (restore and verify say
 * plainly that it is unsigned). Without any key, a signed checkpoint cannot be checked: the
 * status is 'no-key' and the caller says so.
 *
 * Key resolution: `--sign-key FILE`, else `$TLC_SIGN_KEY`, else the per-user key
 * `${XDG_CONFIG_HOME:-~/.config}/tlc/sign.key`, created on first use by commands that sign.
 * A key file holds the key as hex, at least 32 bytes (64 hex digits), and may be read by its
 * owner only (like an ssh key).
 */
export const SIGNATURE_ALG = 'hmac-sha256';
export const KEY_BYTES = 32;
const KEY_ID_HEX = 16;
/** Domain separation: this MAC means "a tlc checkpoint manifest", nothing else signed with the key. */
const MAC_CONTEXT = 'tlc-checkpoint-manifest\n';

export interface ManifestSignature {
  alg: typeof SIGNATURE_ALG;
  /** First 16 hex digits of SHA-256(key): names the key without revealing it. */
  keyId: string;
  mac: string;
}

export type SignatureStatus = 'valid' | 'unsigned' | 'no-key';

export interface SigningKey {
  key: Buffer;
  keyId: string;
  file: string;
  /** True when this call created the per-user key. */
  created: boolean;
}

export function keyIdOf(key: Buffer): string {
  return createHash('sha256').update(key).digest('hex').slice(0, KEY_ID_HEX);
}

/** The per-user key file: `${XDG_CONFIG_HOME:-~/.config}/tlc/sign.key`. */
export function defaultKeyFile(): string {
  const base = process.env.XDG_CONFIG_HOME || path.join(os.homedir(), '.config');
  return path.join(base, 'tlc', 'sign.key');
}

/**
 * Loads the signing key: `keyFile`, else `$TLC_SIGN_KEY`, else the per-user key. A named key file
 * must exist. The per-user key is created when missing if `create` is set (commands that sign);
 * otherwise (commands that only check) a missing per-user key means no key: `undefined`.
 */
export function loadSigningKey(opts: { keyFile?: string; create: boolean }): SigningKey | undefined {
  const named = opts.keyFile || process.env.TLC_SIGN_KEY;
  if (named) return { ...readKeyFile(path.resolve(named)), created: false };
  const file = defaultKeyFile();
  let created = false;
  if (!fs.existsSync(file)) {
    if (!opts.create) return undefined;
    created = createKeyFile(file);
  }
  return { ...readKeyFile(file), created };
}

function readKeyFile(file: string): { key: Buffer; keyId: string; file: string } {
  let text: string;
  let mode: number;
  try {
    mode = fs.statSync(file).mode;
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new TlcError('E_USAGE', `Cannot read signing key ${file}: ${errorText(err)}`, { cause: err });
  }
  if ((mode & 0o077) !== 0) {
    throw new TlcError(
      'E_USAGE',
      `Signing key ${file} is accessible by other users (mode ${(mode & 0o777).toString(8)}): chmod 600 it`,
    );
  }
  const hex = text.trim();
  if (!/^(?:[0-9a-fA-F]{2}){32,}$/.test(hex)) {
    throw new TlcError(
      'E_USAGE',
      `Signing key ${file} must hold at least ${KEY_BYTES} bytes as hex (e.g. from: openssl rand -hex 32)`,
    );
  }
  const key = Buffer.from(hex, 'hex');
  return { key, keyId: keyIdOf(key), file };
}

/**
 * Creates the per-user key atomically: the key is written and fsynced under a private temporary
 * name, then hard-linked to its final name, which fails if the name exists. So two processes
 * racing both end up with the one key that won, and no reader ever sees a partly written key.
 * Returns whether this call's key won.
 */
function createKeyFile(file: string): boolean {
  const dir = path.dirname(file);
  try {
    fs.mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  } catch (err) {
    throw new PersistError('create key directory', dir, err);
  }
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  try {
    const fd = fs.openSync(tmp, 'wx', PRIVATE_FILE_MODE);
    try {
      fs.writeFileSync(fd, randomBytes(KEY_BYTES).toString('hex') + '\n');
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    try {
      fs.linkSync(tmp, file);
    } catch (err) {
      if (isErrnoCode(err, 'EEXIST')) return false;
      throw err;
    }
  } catch (err) {
    throw new PersistError('create signing key', file, err);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  fsyncDir(dir);
  return true;
}

/** Canonical JSON: object keys sorted at every level, no whitespace; `undefined` members dropped. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
    const sorted: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) sorted[k] = (v as Record<string, unknown>)[k];
    return sorted;
  });
}

/** The bytes the MAC covers: the manifest without `checksum` and `signature`. */
export function signedBody(m: Manifest): string {
  const { checksum: _c, signature: _s, ...body } = m;
  return MAC_CONTEXT + canonicalJson(body);
}

function mac(m: Manifest, key: Buffer): Buffer {
  return createHmac('sha256', key).update(signedBody(m)).digest();
}

/** The signature for `m` (its `checksum` and any old `signature` are not covered). */
export function signManifest(m: Manifest, key: Buffer): ManifestSignature {
  return { alg: SIGNATURE_ALG, keyId: keyIdOf(key), mac: mac(m, key).toString('hex') };
}

/**
 * Checks `m`'s signature with `key`. 'unsigned': the manifest has none (the caller applies the
 * policy above); 'no-key': signed, but no key to check it with; 'valid': the MAC matches.
 * Throws E_CORRUPT for a MAC that does not match or a signature made with another key.
 */
export function checkSignature(m: Manifest, key: Buffer | undefined): SignatureStatus {
  const sig = m.signature;
  if (!sig) return 'unsigned';
  if (!key) return 'no-key';
  if (sig.alg !== SIGNATURE_ALG) {
    throw new TlcError('E_CORRUPT', `${m.id}: unknown signature algorithm "${sig.alg}"`);
  }
  const keyId = keyIdOf(key);
  if (sig.keyId !== keyId) {
    throw new TlcError(
      'E_CORRUPT',
      `${m.id}: signed with another key (keyId ${sig.keyId}), not this one (keyId ${keyId})`,
    );
  }
  const expected = mac(m, key);
  const actual = Buffer.from(sig.mac, 'hex');
  if (actual.length !== expected.length || !timingSafeEqual(actual, expected)) {
    throw new TlcError(
      'E_CORRUPT',
      `${m.id}: signature does not match: the manifest or a checksum in it was changed after signing`,
    );
  }
  return 'valid';
}
