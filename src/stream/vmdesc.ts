/**
 * Device-state blob validation. The blob is everything from the first FULL section (or the EOF
 * byte) to the end of the stream:
 *
 *   FULL section × n | u8 0x00 EOF | [u8 0x06 VMDESCRIPTION | be32 json_len | json_len bytes JSON]
 *
 * FULL sections are not length-delimited; the VM description JSON of the same stream gives every
 * section's exact size (reference §3.2), so with it we walk the sections, check each header and
 * footer against the JSON and require the sizes to tile the area exactly. Without a VMDESC (allowed
 * by the format) we can only walk headers and footers heuristically (reference §3.2, method 3) and
 * report `verified: false`.
 */
import { StreamError } from '../core/errors.js';
import { LAYOUT, QEMU } from './constants.js';

export interface DeviceStateInfo {
  /** Number of FULL device sections. */
  sections: number;
  /** Length of the VMDESC JSON (0 without one). */
  vmdescJsonBytes: number;
  /** True when the VMDESC JSON accounted for every byte of every device section. */
  verified: boolean;
  /** The runstate saved in the `globalstate` section (`running`, `paused`, ...), when located. */
  runstate?: string;
}

/** Nesting limit for JSON subsections/structs (QEMU nests a handful of levels). */
const MAX_JSON_DEPTH = 32;
/** VMDESC JSON limit (≈ 100 KB for a pc machine; large SMP guests grow it linearly). */
export const VMDESC_MAX_BYTES = 16 * 1024 * 1024;

interface Located {
  /** Blob offset of the EOF byte == length of the FULL-section area. */
  eofAt: number;
  jsonStart: number;
  jsonLen: number;
}

/** Find `00 06 <be32 L> {…L bytes…}` ending exactly at the end of the blob. */
function locateVmdesc(blob: Buffer): Located | null {
  // JSON never contains a raw 0x06, so only the last 0x06 can be the VMDESCRIPTION byte.
  const p = blob.lastIndexOf(QEMU.QEMU_VM_VMDESCRIPTION);
  if (p < 1 || p + LAYOUT.VMDESC_HEADER > blob.length) return null;
  const jsonLen = blob.readUInt32BE(p + 1);
  const jsonStart = p + LAYOUT.VMDESC_HEADER;
  if (jsonStart + jsonLen !== blob.length || blob[jsonStart] !== 0x7b /* '{' */) return null;
  if (blob[p - 1] !== QEMU.QEMU_VM_EOF) return null;
  return { eofAt: p - 1, jsonStart, jsonLen };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function count(v: unknown): number | null {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : null;
}

/** Payload bytes of one device or subsection description; null when malformed. */
function payloadSize(d: Record<string, unknown>, depth: number): number | null {
  if (depth > MAX_JSON_DEPTH) return null;
  if (typeof d.vmsd_name !== 'string') return count(d.size); // old-style handler
  let total = 0;
  const fields = d.fields ?? [];
  if (!Array.isArray(fields)) return null;
  for (const f of fields) {
    if (!isObject(f)) return null;
    const size = count(f.size);
    const n = f.array_len === undefined ? 1 : count(f.array_len);
    if (size === null || n === null) return null;
    total += size * n;
  }
  const subs = d.subsections ?? [];
  if (!Array.isArray(subs)) return null;
  for (const s of subs) {
    if (!isObject(s) || typeof s.vmsd_name !== 'string') return null;
    const inner = payloadSize(s, depth + 1);
    if (inner === null) return null;
    total += LAYOUT.SUBSECTION_FIXED + Buffer.byteLength(s.vmsd_name) + inner;
  }
  return Number.isSafeInteger(total) ? total : null;
}

/** Size of the fixed part of a FULL header before the payload, for an idstr of `nameLen` bytes. */
function fullHeaderSize(nameLen: number): number {
  return LAYOUT.SHORT_SECTION_HEADER + 1 + nameLen + LAYOUT.FULL_SECTION_HEADER_TAIL;
}

/** `globalstate` payload: be32 strlen+1, then a NUL-padded 100-byte runstate name. */
function readRunstate(blob: Buffer, payloadAt: number, payloadLen: number): string | undefined {
  if (payloadLen !== LAYOUT.GLOBALSTATE_PAYLOAD) return undefined;
  const len = blob.readUInt32BE(payloadAt);
  if (len < 2 || len > QEMU.GLOBALSTATE_RUNSTATE_LEN) return undefined;
  const name = blob.subarray(payloadAt + 4, payloadAt + 4 + len - 1);
  for (const c of name) if ((c < 0x61 || c > 0x7a) && c !== 0x2d) return undefined; // [a-z-]+
  return name.toString('latin1');
}

/**
 * Validate the device-state blob; `base` is the stream offset of its first byte (for errors).
 * Throws StreamError unless the blob is a complete device area.
 */
export function verifyDeviceState(blob: Buffer, base: number, requireVmdesc: boolean): DeviceStateInfo {
  const loc = locateVmdesc(blob);
  if (loc === null) {
    if (requireVmdesc)
      throw new StreamError('stream ends without a VM description (VMDESC)', base + blob.length);
    return walkWithoutVmdesc(blob, base);
  }
  if (loc.jsonLen > VMDESC_MAX_BYTES) {
    throw new StreamError(
      `VMDESC of ${loc.jsonLen} bytes exceeds the ${VMDESC_MAX_BYTES} byte limit`,
      base + loc.eofAt + 1,
    );
  }
  const jsonAt = base + loc.jsonStart;
  let doc: unknown;
  try {
    doc = JSON.parse(blob.toString('utf8', loc.jsonStart));
  } catch (err) {
    throw new StreamError('VMDESC JSON does not parse', jsonAt, { cause: err });
  }
  if (!isObject(doc) || !Array.isArray(doc.devices)) {
    throw new StreamError('VMDESC JSON has no "devices" array', jsonAt);
  }
  let pos = 0;
  let runstate: string | undefined;
  for (const [i, d] of doc.devices.entries()) {
    const at = base + pos;
    if (!isObject(d) || typeof d.name !== 'string' || count(d.instance_id) === null) {
      throw new StreamError(`VMDESC device #${i} is malformed`, jsonAt);
    }
    const payload = payloadSize(d, 0);
    const nameBytes = Buffer.from(d.name, 'utf8');
    if (payload === null || nameBytes.length > QEMU.CSTR_MAX) {
      throw new StreamError(`VMDESC device #${i} (${d.name}) has malformed sizes`, jsonAt);
    }
    const headerLen = fullHeaderSize(nameBytes.length);
    const sectionLen = headerLen + payload + LAYOUT.SECTION_FOOTER;
    if (pos + sectionLen > loc.eofAt) {
      throw new StreamError(
        `VMDESC device sizes exceed the device area (${loc.eofAt} bytes) at section #${i} (${d.name})`,
        at,
      );
    }
    // Header: 0x04, be32 id, cstr idstr, be32 instance_id, be32 version_id.
    if (blob[pos] !== QEMU.QEMU_VM_SECTION_FULL) {
      throw new StreamError(`expected a FULL section for ${d.name}, found type 0x${hex(blob[pos])}`, at);
    }
    const sectionId = blob.readUInt32BE(pos + 1);
    const nameAt = pos + LAYOUT.SHORT_SECTION_HEADER;
    if (
      blob[nameAt] !== nameBytes.length ||
      !blob.subarray(nameAt + 1, nameAt + 1 + nameBytes.length).equals(nameBytes)
    ) {
      throw new StreamError(
        `FULL section idstr does not match VMDESC device #${i} (${d.name})`,
        base + nameAt,
      );
    }
    const tailAt = nameAt + 1 + nameBytes.length;
    if (blob.readUInt32BE(tailAt) !== d.instance_id) {
      throw new StreamError(`FULL section ${d.name}: instance id does not match VMDESC`, base + tailAt);
    }
    if (typeof d.version === 'number' && blob.readUInt32BE(tailAt + 4) !== d.version) {
      throw new StreamError(`FULL section ${d.name}: version id does not match VMDESC`, base + tailAt + 4);
    }
    const footerAt = pos + sectionLen - LAYOUT.SECTION_FOOTER;
    if (blob[footerAt] !== QEMU.QEMU_VM_SECTION_FOOTER || blob.readUInt32BE(footerAt + 1) !== sectionId) {
      throw new StreamError(
        `bad footer of FULL section ${d.name} (section id ${sectionId})`,
        base + footerAt,
      );
    }
    if (d.name === QEMU.GLOBALSTATE_IDSTR) runstate = readRunstate(blob, pos + headerLen, payload);
    pos += sectionLen;
  }
  if (pos !== loc.eofAt) {
    throw new StreamError(
      `VMDESC accounts for ${pos} bytes of device sections but the device area is ${loc.eofAt} bytes`,
      base + pos,
    );
  }
  const info: DeviceStateInfo = {
    sections: doc.devices.length,
    vmdescJsonBytes: loc.jsonLen,
    verified: true,
  };
  if (runstate !== undefined) info.runstate = runstate;
  return info;
}

function hex(v: number | undefined): string {
  return (v ?? 0).toString(16).padStart(2, '0');
}

/** A plausible FULL header at `pos`: type 0x04, non-empty printable idstr, room for the tail. */
function plausibleHeader(blob: Buffer, pos: number, end: number): number {
  if (blob[pos] !== QEMU.QEMU_VM_SECTION_FULL) return -1;
  const nameAt = pos + LAYOUT.SHORT_SECTION_HEADER;
  if (nameAt >= end) return -1;
  const n = blob[nameAt] as number;
  const headerLen = fullHeaderSize(n);
  if (n === 0 || pos + headerLen + LAYOUT.SECTION_FOOTER > end) return -1;
  for (let k = nameAt + 1; k <= nameAt + n; k++) {
    const c = blob[k] as number;
    if (c < 0x21 || c > 0x7e) return -1;
  }
  return headerLen;
}

/**
 * No VMDESC: the area must end with EOF and tile into FULL sections where each footer repeats its
 * header's id and is followed by another plausible header or the final EOF. Payloads are opaque, so
 * this is a heuristic (a payload may contain a fake footer); it never sets `verified`.
 */
function walkWithoutVmdesc(blob: Buffer, base: number): DeviceStateInfo {
  const eofAt = blob.length - 1;
  if (eofAt < 0 || blob[eofAt] !== QEMU.QEMU_VM_EOF) {
    throw new StreamError('truncated stream: device state does not end with EOF', base + blob.length);
  }
  let pos = 0;
  let sections = 0;
  let runstate: string | undefined;
  const footer = Buffer.alloc(LAYOUT.SECTION_FOOTER);
  footer[0] = QEMU.QEMU_VM_SECTION_FOOTER;
  while (pos < eofAt) {
    const headerLen = plausibleHeader(blob, pos, eofAt);
    if (headerLen < 0)
      throw new StreamError('device state without VMDESC: no FULL section header here', base + pos);
    footer.writeUInt32BE(blob.readUInt32BE(pos + 1), 1);
    let search = pos + headerLen;
    let next = -1;
    for (;;) {
      const f = blob.indexOf(footer, search);
      if (f < 0 || f + LAYOUT.SECTION_FOOTER > eofAt) break;
      const after = f + LAYOUT.SECTION_FOOTER;
      if (after === eofAt || plausibleHeader(blob, after, eofAt) >= 0) {
        next = after;
        break;
      }
      search = f + 1;
    }
    if (next < 0)
      throw new StreamError("device state without VMDESC: cannot find this section's footer", base + pos);
    const nameLen = blob[pos + LAYOUT.SHORT_SECTION_HEADER] as number;
    const name = blob.toString(
      'latin1',
      pos + LAYOUT.SHORT_SECTION_HEADER + 1,
      pos + LAYOUT.SHORT_SECTION_HEADER + 1 + nameLen,
    );
    if (name === QEMU.GLOBALSTATE_IDSTR) {
      runstate = readRunstate(blob, pos + headerLen, next - LAYOUT.SECTION_FOOTER - pos - headerLen);
    }
    sections++;
    pos = next;
  }
  const info: DeviceStateInfo = { sections, vmdescJsonBytes: 0, verified: false };
  if (runstate !== undefined) info.runstate = runstate;
  return info;
}
