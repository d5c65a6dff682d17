/**
 * The configuration section, written right after the file header (savevm.c vmstate_configuration):
 *
 *   u8 0x07 | be32 name_len | machine type name | subsection*
 *   subsection: u8 0x05 | cstr name | be32 version (1) | payload
 *     configuration/target-page-bits  be32 bits
 *     configuration/capabilities      be32 count, count × cstr name (7.2 validates only x-ignore-shared)
 *     configuration/uuid              16 bytes
 *
 * There is no footer: the section ends at the first byte after it that is not 0x05.
 */
import { StreamError } from '../core/errors.js';
import { QEMU } from './constants.js';
import { ByteQueue } from './queue.js';

/** What the configuration section says. */
export interface ConfigurationInfo {
  /** Resolved machine type, e.g. `pc-i440fx-7.2`. */
  machineType: string;
  /** Validated capabilities (7.2: at most `x-ignore-shared`). */
  capabilities: string[];
  /** From `configuration/target-page-bits`, when present. */
  targetPageBits?: number;
  /** From `configuration/uuid`, when present. */
  uuid?: Buffer;
}

/** More than the one capability 7.2 validates. */
const MAX_CONFIG_CAPABILITIES = 16;

function hex(v: number): string {
  return '0x' + v.toString(16);
}

/** Latin-1 string of `n` queued bytes at `at` (rare paths only: names, errors). */
export function peekString(q: ByteQueue, at: number, n: number): string {
  let s = '';
  for (let k = 0; k < n; k++) s += String.fromCharCode(q.u8(at + k));
  return s;
}

/**
 * Decode the configuration section at the head of `q` without consuming it. Returns null when more
 * bytes are needed (the section's end is only known from the byte after it, unless `atEnd`).
 */
export function decodeConfiguration(
  q: ByteQueue,
  atEnd: boolean,
  base: number,
): { info: ConfigurationInfo; length: number } | null {
  if (q.length < 1) return null;
  const type = q.u8(0);
  if (type !== QEMU.QEMU_VM_CONFIGURATION) {
    throw new StreamError(
      `expected the configuration section (0x07) after the file header, found ${hex(type)} ` +
        '(streams without one, from machine types 2.3 and older, are not supported)',
      base,
    );
  }
  if (q.length < 5) return null;
  const nameLen = q.u32(1);
  if (nameLen === 0 || nameLen > QEMU.CSTR_MAX) {
    throw new StreamError(
      `machine type name length ${nameLen} is out of range 1..${QEMU.CSTR_MAX}`,
      base + 1,
    );
  }
  let p = 5 + nameLen;
  if (q.length < p) return null;
  const info: ConfigurationInfo = { machineType: peekString(q, 5, nameLen), capabilities: [] };
  const seen = new Set<string>();
  for (;;) {
    if (q.length <= p) {
      if (atEnd) break;
      return null;
    }
    if (q.u8(p) !== QEMU.QEMU_VM_SUBSECTION) break;
    if (q.length < p + 2) return null;
    const n = q.u8(p + 1);
    const body = p + 2 + n + 4;
    if (q.length < body) return null;
    const name = peekString(q, p + 2, n);
    if (seen.has(name)) throw new StreamError(`configuration subsection ${name} appears twice`, base + p);
    seen.add(name);
    const version = q.u32(p + 2 + n);
    if (version !== QEMU.CONFIGURATION_SUBSECTION_VERSION) {
      throw new StreamError(
        `configuration subsection ${JSON.stringify(name)} has version ${version}`,
        base + p,
      );
    }
    switch (name) {
      case QEMU.CONFIGURATION_SUBSECTION_PAGE_BITS: {
        if (q.length < body + 4) return null;
        const bits = q.u32(body);
        if (bits < QEMU.TARGET_PAGE_BITS_MIN || bits > QEMU.TARGET_PAGE_BITS_MAX) {
          throw new StreamError(`target page bits ${bits} out of range`, base + body);
        }
        info.targetPageBits = bits;
        p = body + 4;
        break;
      }
      case QEMU.CONFIGURATION_SUBSECTION_CAPABILITIES: {
        if (q.length < body + 4) return null;
        const count = q.u32(body);
        if (count > MAX_CONFIG_CAPABILITIES) {
          throw new StreamError(`${count} capabilities in the configuration section`, base + body);
        }
        let c = body + 4;
        const caps: string[] = [];
        for (let i = 0; i < count; i++) {
          if (q.length < c + 1) return null;
          const len = q.u8(c);
          if (q.length < c + 1 + len) return null;
          const cap = peekString(q, c + 1, len);
          if (cap !== QEMU.MIGRATION_CAPABILITY_X_IGNORE_SHARED) {
            throw new StreamError(`unknown validated capability ${JSON.stringify(cap)}`, base + c);
          }
          caps.push(cap);
          c += 1 + len;
        }
        info.capabilities = caps;
        p = c;
        break;
      }
      case QEMU.CONFIGURATION_SUBSECTION_UUID: {
        if (q.length < body + QEMU.UUID_LEN) return null;
        const uuid = Buffer.alloc(QEMU.UUID_LEN);
        for (let k = 0; k < QEMU.UUID_LEN; k++) uuid[k] = q.u8(body + k);
        info.uuid = uuid;
        p = body + QEMU.UUID_LEN;
        break;
      }
      default:
        throw new StreamError(`unknown configuration subsection ${JSON.stringify(name)}`, base + p);
    }
  }
  return { info, length: p };
}

/** Decode a complete configuration section (e.g. the `raw` bytes handed to onConfiguration). */
export function parseConfiguration(raw: Buffer): ConfigurationInfo {
  const q = new ByteQueue();
  q.push(raw);
  const r = decodeConfiguration(q, true, 0);
  if (r === null) throw new StreamError('truncated configuration section', raw.length);
  if (r.length !== raw.length) throw new StreamError('bytes after the configuration section', r.length);
  return r.info;
}
