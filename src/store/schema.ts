import { z } from 'zod';
import { TlcError } from '../core/errors.js';
import { validateVmName } from '../vm/spec.js';
import {
  DEVICE_FILE,
  DISK_LAYER_RE,
  IMAGE_FILE_RE,
  MANIFEST_FORMAT_MINOR,
  MANIFEST_MAGIC,
  MAX_BLOCK_BYTES,
  type Manifest,
  PAGE_SIZE,
  SUMS_FILE_RE,
  HASHES_FILE_RE,
  DELTA_FILE_RE,
  canonicalBody,
  deltaFileName,
  hashesFileName,
  formatSupport,
  imageFileName,
  sha256Hex,
  sumsFileName,
} from './manifest.js';
import { SIGNATURE_ALG } from './sign.js';

/**
 * The manifest's schema. Everything in a manifest is validated before use: it may come from a
 * store other users (or a memory server) can write. Strings that end up on a terminal or in a
 * QEMU command line carry no control characters; sizes have upper bounds; file names are tlc's own.
 *
 * `strict` (this tlc's minor format or older) refuses unknown fields; a newer minor format passes
 * them through (see the format policy in manifest.ts). The VM spec and the metrics pass unknown
 * keys through at every version.
 */
const MAX_BLOCKS = 4096;
const MAX_DEVICE_BYTES = 2 ** 30;
const MAX_MEM_MIB = MAX_BLOCK_BYTES / 2 ** 20;
const MAX_CPUS = 4096;
const MAX_ARGS = 4096;
const MAX_TEXT = 4096;

function hasControlChars(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) return true;
  }
  return false;
}
const text = (max = MAX_TEXT) =>
  z
    .string()
    .max(max)
    .refine((s) => !hasControlChars(s), 'must not contain control characters');
const nonEmptyText = (max = MAX_TEXT) => text(max).refine((s) => s.length > 0, 'must not be empty');
const absolutePath = () => nonEmptyText().refine((s) => s.startsWith('/'), 'must be an absolute path');
const sha256 = () => z.string().regex(/^[0-9a-f]{64}$/, 'must be a SHA-256 as 64 lowercase hex digits');
const u32 = () => z.number().int().min(0).max(0xffff_ffff);
const count = () => z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
/** A name safe as one path component and as a QEMU option value: no '/' or ',', no leading '.'. */
const idName = (max: number) =>
  z
    .string()
    .regex(
      new RegExp(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,${max - 1}}$`),
      `must be 1-${max} letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
const qemuVersion = () =>
  z.string().regex(/^\d{1,4}\.\d{1,4}\.\d{1,4}$/, 'must be a QEMU version like 7.2.0');

/** Metrics are for humans: numbers where the type has them, no ranges, extra keys allowed. */
const num = () => z.number().finite();
const metricsSchema = z
  .object({
    setupMs: num(),
    warmUpMs: num().optional(),
    stage1: z.object({ ms: num(), bytes: num() }).passthrough(),
    stage2: z.object({ iterations: num(), ms: num(), bytes: num() }).passthrough(),
    stage3: z.object({ ms: num(), bytes: num(), downtimeMs: num() }).passthrough(),
    totalMs: num(),
    durableMs: num(),
    qemuDowntimeMs: num().optional(),
    qemuSetupMs: num().optional(),
    bytesReceived: num(),
    bytesStored: num(),
    tcgFixup: z.object({ pages: num(), ms: num() }).passthrough().optional(),
    control: z
      .object({
        deadlineMs: num(),
        maxThrottlePct: num(),
        plannedDowntimeMs: num().optional(),
        stopAndSaveMs: num().optional(),
        forcedSwitchover: z
          .object({ atMs: num(), reason: text(1024), expectedDowntimeMs: num() })
          .passthrough()
          .optional(),
        metDeadline: z.boolean(),
        missedBecause: text(1024).optional(),
      })
      .passthrough()
      .optional(),
  })
  .passthrough();

/** QEMU's rule for node names and device ids: a letter, then letters, digits, '-', '.', '_'. */
const qemuId = () =>
  z
    .string()
    .regex(/^[A-Za-z][A-Za-z0-9_.-]{0,30}$/, 'must be a QEMU id (a letter, then up to 30 of [A-Za-z0-9_.-])');

/** A virtio-blk disk (spec.ts `VmDisk`); fields added to VmDisk later pass through. */
const diskSchema = z
  .object({
    path: absolutePath(),
    format: z.enum(['qcow2', 'raw']),
    node: qemuId(),
    device: qemuId(),
    readOnly: z.boolean().optional(),
  })
  .passthrough();

/**
 * The VM spec copied into the manifest (src/vm/spec.ts `VmSpec`). Known fields are validated;
 * fields added to VmSpec later pass through unvalidated until they are added here.
 */
export const vmSpecSchema = z
  .object({
    specVersion: z.literal(1),
    name: z.string().refine(
      (s) => {
        try {
          validateVmName(s);
          return true;
        } catch {
          return false;
        }
      },
      { message: "must be a VM name: 1-64 letters, digits, '.', '_' or '-'" },
    ),
    qemu: z.object({ binary: nonEmptyText(), version: qemuVersion() }).strict(),
    machine: idName(64),
    accel: z.enum(['tcg', 'kvm']),
    memMiB: z.number().int().min(1).max(MAX_MEM_MIB),
    cpus: z.number().int().min(1).max(MAX_CPUS),
    memory: z.discriminatedUnion('kind', [
      z.object({ kind: z.literal('ram') }).strict(),
      z.object({ kind: z.literal('memfd') }).strict(),
      z.object({ kind: z.literal('file'), path: absolutePath(), share: z.boolean() }).strict(),
    ]),
    kernel: absolutePath().optional(),
    initrd: absolutePath().optional(),
    append: text().optional(),
    workload: text(256).optional(),
    disks: z.array(diskSchema).max(64).optional(),
    extraArgs: z.array(text()).max(MAX_ARGS),
    adoptedArgv: z.array(text()).max(MAX_ARGS).optional(),
    ramBlock: z
      .string()
      .regex(/^[A-Za-z][A-Za-z0-9_.-]{0,63}$/, 'must be a QEMU object id')
      .optional(),
    libvirt: z
      .object({ domain: nonEmptyText(255), uri: nonEmptyText(255), xml: z.string().max(4 * 2 ** 20) })
      .optional(),
  })
  .passthrough();

function manifestSchema(strict: boolean) {
  const obj = <T extends z.ZodRawShape>(shape: T) =>
    strict ? z.object(shape).strict() : z.object(shape).passthrough();
  const block = obj({
    name: nonEmptyText(255),
    usedLength: z
      .number()
      .int()
      .min(0)
      .max(MAX_BLOCK_BYTES, 'must be at most 1 TiB')
      .refine((n) => n % PAGE_SIZE === 0, `must be a multiple of the page size (${PAGE_SIZE})`),
    file: z.string().regex(IMAGE_FILE_RE, 'must be a tlc image file name (block-<n>.img)'),
    sumsFile: z.string().regex(SUMS_FILE_RE, 'must be a tlc sums file name (block-<n>.img.sums)'),
    sumsSha256: sha256(),
    dataPages: count(),
    hashesFile: z.string().regex(HASHES_FILE_RE, 'must be a tlc hashes file name').optional(),
    hashesSha256: sha256().optional(),
    storedPages: count().optional(),
    deltaFile: z.string().regex(DELTA_FILE_RE, 'must be a tlc delta file name').optional(),
    deltaSha256: sha256().optional(),
    deltaBytes: z
      .number()
      .int()
      .min(0)
      .max(2 ** 42)
      .optional(),
    deltaPages: count().optional(),
  });
  return obj({
    magic: z.literal(MANIFEST_MAGIC),
    formatVersion: z.tuple([count(), count()]),
    id: idName(128),
    createdAt: z.string().datetime({ message: 'must be an ISO 8601 UTC time' }),
    mode: z.enum(['live', 'cow', 'stop']),
    vm: vmSpecSchema,
    qemuVersion: qemuVersion(),
    machineType: idName(64),
    pageSize: z.literal(PAGE_SIZE),
    ramSection: obj({ sectionId: u32(), instanceId: u32(), versionId: u32() }),
    blocks: z.array(block).min(1).max(MAX_BLOCKS),
    configSha256: sha256(),
    device: obj({
      file: z.literal(DEVICE_FILE),
      bytes: z.number().int().min(0).max(MAX_DEVICE_BYTES),
      sha256: sha256(),
      sections: u32(),
      runstate: z
        .string()
        .regex(/^[a-z][a-z0-9-]{0,31}$/, 'must be a QEMU run state')
        .optional(),
    }),
    disks: z
      .array(
        obj({
          // A disk tlc does not manage keeps QEMU's own names (a qdev path, an automatic "#block1" node).
          device: nonEmptyText(255),
          node: nonEmptyText(255),
          path: absolutePath().optional(),
          format: z.enum(['qcow2', 'raw']),
          virtualSize: z
            .number()
            .int()
            .min(0)
            .max(2 ** 50),
          captured: z.boolean(),
          reason: text(1024).optional(),
          layers: z
            .array(
              obj({
                file: z.string().regex(DISK_LAYER_RE, 'must be a tlc disk layer name (disk<d>-<l>.qcow2)'),
                bytes: z
                  .number()
                  .int()
                  .min(0)
                  .max(2 ** 50),
                sha256: sha256(),
                backing: z.string().max(512).optional(),
              }),
            )
            .max(4),
          parent: obj({
            checkpoint: idName(128),
            file: z.string().regex(DISK_LAYER_RE, 'must be a tlc disk layer name'),
          }).optional(),
          bitmap: z
            .string()
            .regex(/^tlc-[A-Za-z0-9_.-]{1,160}$/, 'must be a tlc bitmap name')
            .optional(),
          copiedBytes: z
            .number()
            .int()
            .min(0)
            .max(2 ** 50),
        }),
      )
      .max(64)
      .optional(),
    parent: idName(128).optional(),
    storedBytes: count().optional(),
    metrics: metricsSchema,
    vmWasRunning: z.boolean(),
    guestHeartbeatSeqBefore: count().optional(),
    signature: obj({
      alg: z.literal(SIGNATURE_ALG),
      keyId: z.string().regex(/^[0-9a-f]{16}$/, 'must be 16 lowercase hex digits'),
      mac: sha256(),
    }).optional(),
    checksum: sha256(),
  }).superRefine((m, ctx) => {
    if (m.parent !== undefined && (m.parent === m.id || !m.parent.startsWith(`${m.vm.name}-`))) {
      ctx.addIssue({
        code: 'custom',
        path: ['parent'],
        message: `must be another checkpoint of VM "${m.vm.name}"`,
      });
    }
    if (!m.id.startsWith(`${m.vm.name}-`)) {
      ctx.addIssue({
        code: 'custom',
        path: ['id'],
        message: `must start with the VM name ("${m.vm.name}-")`,
      });
    }
    const names = new Set<string>();
    m.blocks.forEach((b, i) => {
      if (b.file !== imageFileName(i)) {
        ctx.addIssue({ code: 'custom', path: ['blocks', i, 'file'], message: `must be ${imageFileName(i)}` });
      }
      if (b.sumsFile !== sumsFileName(i)) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'sumsFile'],
          message: `must be ${sumsFileName(i)}`,
        });
      }
      if (b.hashesFile !== undefined && b.hashesFile !== hashesFileName(i)) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'hashesFile'],
          message: `must be ${hashesFileName(i)}`,
        });
      }
      if ((b.hashesFile === undefined) !== (b.hashesSha256 === undefined)) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'hashesSha256'],
          message: 'hashesFile and hashesSha256 come together',
        });
      }
      if (m.parent !== undefined && b.hashesFile === undefined) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'hashesFile'],
          message: 'missing (an incremental checkpoint has page hashes for every block)',
        });
      }
      const delta = [b.deltaFile, b.deltaSha256, b.deltaBytes, b.deltaPages];
      if (delta.some((v) => v !== undefined) && delta.some((v) => v === undefined)) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'deltaFile'],
          message: 'deltaFile, deltaSha256, deltaBytes and deltaPages come together',
        });
      }
      if (b.deltaFile !== undefined && (b.deltaFile !== deltaFileName(i) || m.parent === undefined)) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'deltaFile'],
          message: `must be ${deltaFileName(i)}, in an incremental checkpoint`,
        });
      }
      if (b.storedPages !== undefined && b.storedPages > b.usedLength / PAGE_SIZE) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'storedPages'],
          message: `${b.storedPages} exceeds the block's ${b.usedLength / PAGE_SIZE} pages`,
        });
      }
      if (names.has(b.name)) {
        ctx.addIssue({ code: 'custom', path: ['blocks', i, 'name'], message: `duplicate block "${b.name}"` });
      }
      names.add(b.name);
      if (b.dataPages > b.usedLength / PAGE_SIZE) {
        ctx.addIssue({
          code: 'custom',
          path: ['blocks', i, 'dataPages'],
          message: `${b.dataPages} exceeds the block's ${b.usedLength / PAGE_SIZE} pages`,
        });
      }
    });
  });
}

const strictSchema = manifestSchema(true);
const newerMinorSchema = manifestSchema(false);

// Compile-time guard: every field of `Manifest` is in the schema (a new field must be validated).
type Missing = Exclude<keyof Manifest, keyof z.infer<typeof strictSchema>>;
const _allFieldsValidated: [Missing] extends [never] ? true : Missing = true;

/** `blocks[0].file`, `vm.memory.path`, ... */
export function fieldPath(p: readonly (string | number)[]): string {
  let out = '';
  for (const part of p) out += typeof part === 'number' ? `[${part}]` : out ? `.${part}` : part;
  return out || '(top level)';
}

function describe(issue: z.ZodIssue): string {
  switch (issue.code) {
    case 'invalid_type':
      return issue.received === 'undefined' ? 'missing' : `expected ${issue.expected}, got ${issue.received}`;
    case 'unrecognized_keys':
      return `unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')} (format 1.${MANIFEST_FORMAT_MINOR} has no such field)`;
    default:
      return issue.message.charAt(0).toLowerCase() + issue.message.slice(1);
  }
}

/** Control characters of a hostile value shown as `\u001b`, so an error stays one harmless line. */
function printable(s: string): string {
  let out = '';
  for (const ch of s) {
    const c = ch.charCodeAt(0);
    out += c < 0x20 || c === 0x7f ? `\\u${c.toString(16).padStart(4, '0')}` : ch;
  }
  return out;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Parses and validates a manifest: JSON, magic, format version (policy in manifest.ts), the whole
 * schema, then the checksum. Throws E_CORRUPT with one line naming the field and the problem.
 * The signature is checked separately (`checkSignature` in sign.ts), as it needs the key.
 */
export function openManifest(text: string, where: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new TlcError('E_CORRUPT', `${where}: manifest is not valid JSON`);
  }
  if (!isPlainObject(raw) || raw.magic !== MANIFEST_MAGIC) {
    throw new TlcError('E_CORRUPT', `${where}: not a tlc checkpoint manifest`);
  }
  const version = z.tuple([count(), count()]).safeParse(raw.formatVersion);
  if (!version.success) {
    throw new TlcError(
      'E_CORRUPT',
      `${where}: invalid manifest: field formatVersion: must be [major, minor], two non-negative integers`,
    );
  }
  const support = formatSupport(version.data, where);
  const parsed = (support === 'known' ? strictSchema : newerMinorSchema).safeParse(raw);
  if (!parsed.success) {
    const [first, ...rest] = parsed.error.issues;
    const more = rest.length > 0 ? ` (and ${rest.length} more problem${rest.length > 1 ? 's' : ''})` : '';
    throw new TlcError(
      'E_CORRUPT',
      printable(
        `${where}: invalid manifest: field ${fieldPath(first?.path ?? [])}: ${first ? describe(first) : 'invalid'}${more}`,
      ),
    );
  }
  // The checksum covers the JSON as written (key order included), so it is taken over `raw`.
  if (raw.checksum !== sha256Hex(canonicalBody(raw as unknown as Manifest))) {
    throw new TlcError(
      'E_CORRUPT',
      `${where}: manifest checksum mismatch (the file was modified or damaged)`,
    );
  }
  return parsed.data;
}
