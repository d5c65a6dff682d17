/**
 * QEMU 7.2 migration stream constants, under QEMU's own names (migration/savevm.c, migration/ram.c,
 * migration/qemu-file.h, include/migration/register.h). Wire reference:
 * /work/shared/reference/qemu-migration-stream.md. All multi-byte integers are big-endian.
 */
export const QEMU = {
  // ---- file header (savevm.c) -------------------------------------------------------------------
  QEMU_VM_FILE_MAGIC: 0x5145564d, // "QEVM"
  QEMU_VM_FILE_VERSION_COMPAT: 0x00000002, // retired: rejected as obsolete by every modern QEMU
  QEMU_VM_FILE_VERSION: 0x00000003,

  // ---- top-level record types (savevm.c) --------------------------------------------------------
  QEMU_VM_EOF: 0x00,
  QEMU_VM_SECTION_START: 0x01,
  QEMU_VM_SECTION_PART: 0x02,
  QEMU_VM_SECTION_END: 0x03,
  QEMU_VM_SECTION_FULL: 0x04,
  QEMU_VM_SUBSECTION: 0x05, // only inside a vmstate payload (and the configuration section)
  QEMU_VM_VMDESCRIPTION: 0x06, // only after EOF
  QEMU_VM_CONFIGURATION: 0x07, // only directly after the file header
  QEMU_VM_COMMAND: 0x08,
  QEMU_VM_SECTION_FOOTER: 0x7e,

  // ---- QEMU_VM_COMMAND numbers (savevm.c enum qemu_vm_cmd) ---------------------------------------
  MIG_CMD_INVALID: 0,
  MIG_CMD_OPEN_RETURN_PATH: 1,
  MIG_CMD_PING: 2,
  MIG_CMD_POSTCOPY_ADVISE: 3,
  MIG_CMD_POSTCOPY_LISTEN: 4,
  MIG_CMD_POSTCOPY_RUN: 5,
  MIG_CMD_POSTCOPY_RAM_DISCARD: 6,
  MIG_CMD_PACKAGED: 7,
  MIG_CMD_ENABLE_COLO: 8,
  MIG_CMD_POSTCOPY_RESUME: 9,
  MIG_CMD_RECV_BITMAP: 10,
  MIG_CMD_MAX: 11, // first invalid number in 7.2 (later QEMUs add commands)

  // ---- RAM record flags: low bits of the be64 record word (ram.c) -------------------------------
  RAM_SAVE_FLAG_FULL: 0x01, // retired in 2009: never written, never accepted
  RAM_SAVE_FLAG_ZERO: 0x02, // called RAM_SAVE_FLAG_COMPRESS before QEMU 5.0
  RAM_SAVE_FLAG_MEM_SIZE: 0x04,
  RAM_SAVE_FLAG_PAGE: 0x08,
  RAM_SAVE_FLAG_EOS: 0x10,
  RAM_SAVE_FLAG_CONTINUE: 0x20,
  RAM_SAVE_FLAG_XBZRLE: 0x40,
  RAM_SAVE_FLAG_HOOK: 0x80, // RDMA transport only; never in socket/file streams
  RAM_SAVE_FLAG_COMPRESS_PAGE: 0x100,
  RAM_SAVE_FLAG_MULTIFD_FLUSH: 0x200, // NOT in 7.2: added by QEMU 8.0; seeing it means a newer source
  /** All flag bits fit under the smallest target page size (1 KiB); QEMU uses at most 10 bits. */
  RAM_SAVE_FLAG_BITS: 10,

  /** The RAM handler's identity and the only version a 7.2 destination accepts. */
  RAM_IDSTR: 'ram',
  RAM_VERSION_ID: 4,

  // ---- XBZRLE (ram.c, xbzrle.c) -----------------------------------------------------------------
  ENCODING_FLAG_XBZRLE: 0x01,
  /** skip/count runs are ULEB128 limited to 2 bytes. */
  XBZRLE_MAX_RUN: 0x3fff,

  // ---- configuration section (savevm.c vmstate_configuration) -----------------------------------
  CONFIGURATION_SUBSECTION_PAGE_BITS: 'configuration/target-page-bits',
  CONFIGURATION_SUBSECTION_CAPABILITIES: 'configuration/capabilities',
  CONFIGURATION_SUBSECTION_UUID: 'configuration/uuid',
  CONFIGURATION_SUBSECTION_VERSION: 1,
  UUID_LEN: 16,
  /** The only capability 7.2 validates through the configuration section. */
  MIGRATION_CAPABILITY_X_IGNORE_SHARED: 'x-ignore-shared',

  /** `cstr` (u8 length) limit. */
  CSTR_MAX: 255,
  /** x86 and most targets; variable-page-size targets announce theirs in the configuration. */
  TARGET_PAGE_SIZE_DEFAULT: 4096,
  /** TARGET_PAGE_BITS range across QEMU's targets (1 KiB .. 64 KiB). */
  TARGET_PAGE_BITS_MIN: 10,
  TARGET_PAGE_BITS_MAX: 16,

  // ---- globalstate section payload (migration/global_state.c) ----------------------------------
  GLOBALSTATE_IDSTR: 'globalstate',
  GLOBALSTATE_RUNSTATE_LEN: 100,
} as const;

/**
 * Byte sizes of the fixed-layout pieces, one place (no inline offsets in the parsers).
 */
export const LAYOUT = {
  /** be32 magic + be32 version. */
  FILE_HEADER: 8,
  /** u8 type + be32 section_id (PART/END header; also the footer: u8 0x7E + be32 section_id). */
  SHORT_SECTION_HEADER: 5,
  SECTION_FOOTER: 5,
  /** After the idstr of a START/FULL header: be32 instance_id + be32 version_id. */
  FULL_SECTION_HEADER_TAIL: 8,
  /** u8 type + be16 command + be16 length. */
  COMMAND_HEADER: 5,
  /** be64 record word. */
  RAM_WORD: 8,
  /** u8 encoding + be16 length. */
  XBZRLE_HEADER: 3,
  /** be32 compressed length. */
  COMPRESS_HEADER: 4,
  /** u8 type + be32 json_len. */
  VMDESC_HEADER: 5,
  /** Subsection: u8 0x05 + cstr name + be32 version_id; the fixed part without the name bytes. */
  SUBSECTION_FIXED: 1 + 1 + 4,
  /** globalstate payload: be32 length + 100 byte runstate buffer. */
  GLOBALSTATE_PAYLOAD: 4 + 100,
} as const;

/** zlib's compressBound(): the largest valid COMPRESS_PAGE length for a page of `tps` bytes. */
export function compressBound(tps: number): number {
  return tps + (tps >>> 12) + (tps >>> 14) + (tps >>> 25) + 13;
}
