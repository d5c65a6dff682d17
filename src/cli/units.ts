import { UsageError } from '../core/errors.js';

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, min: 60_000 };

/** Parses `500ms`, `5s`, `1.5s`, `2m` into milliseconds. Flags carry their unit. */
export function parseDuration(value: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|min)$/.exec(value.trim());
  if (!m?.[1] || !m[2])
    throw new UsageError(`${flag} needs a duration with a unit, e.g. 5s or 300ms (got "${value}")`);
  return Number(m[1]) * (DURATION_UNITS[m[2]] ?? 1);
}

export function parsePositiveInt(value: string, flag: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0)
    throw new UsageError(`${flag} needs a positive integer (got "${value}")`);
  return n;
}

const RATE_UNITS: Record<string, number> = {
  'B/s': 1,
  'KiB/s': 1024,
  'MiB/s': 1024 ** 2,
  'GiB/s': 1024 ** 3,
};

/** Parses `64MiB/s`, `1GiB/s` into bytes per second. */
export function parseRate(value: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(B\/s|KiB\/s|MiB\/s|GiB\/s)$/.exec(value.trim());
  if (!m?.[1] || !m[2])
    throw new UsageError(`${flag} needs a rate with a unit, e.g. 64MiB/s (got "${value}")`);
  return Math.round(Number(m[1]) * (RATE_UNITS[m[2]] ?? 1));
}

const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 };

/** Parses `64MiB`, `1GiB`, `512KiB` into bytes. */
export function parseSize(value: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)$/.exec(value.trim());
  if (!m?.[1] || !m[2]) throw new UsageError(`${flag} needs a size with a unit, e.g. 64MiB (got "${value}")`);
  return Math.round(Number(m[1]) * (SIZE_UNITS[m[2]] ?? 1));
}
