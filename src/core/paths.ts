import os from 'node:os';
import path from 'node:path';

/** Where tlc keeps VM runtime state (specs, QMP sockets, console logs). `$TLC_HOME` overrides. */
export function tlcHome(): string {
  if (process.env.TLC_HOME) return path.resolve(process.env.TLC_HOME);
  const base = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'tlc');
}

export function vmsDir(): string {
  return path.join(tlcHome(), 'vms');
}

/** Checkpoint store: `--store` wins, then `$TLC_STORE`, then a per-user default. */
export function defaultStoreDir(): string {
  if (process.env.TLC_STORE) return path.resolve(process.env.TLC_STORE);
  const base = process.env.XDG_DATA_HOME || path.join(os.homedir(), '.local', 'share');
  return path.join(base, 'tlc', 'checkpoints');
}

/** Owner-only: checkpoint files and sockets hold guest memory. */
export const PRIVATE_DIR_MODE = 0o700;
export const PRIVATE_FILE_MODE = 0o600;
