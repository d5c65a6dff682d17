import fs from 'node:fs';
import path from 'node:path';
import { CONFIG_FILE } from '../store/manifest.js';
import type { StoredCheckpoint } from '../store/store.js';
import { ChainBlockReader } from '../store/chain.js';
import { MigrationStreamWriter } from '../stream/writer.js';
import { ramBlockOf } from '../vm/spec.js';

/** The chain reader's chunk: one per-MiB sums chunk. */
const READ_CHUNK_BYTES = 1024 * 1024;

export interface SynthesisStats {
  pagesSent: number;
  zeroPagesSent: number;
  bytesWritten: number;
}

/**
 * Writes the migration stream a restoring QEMU loads. Lazy: guest RAM (`ram0`) is mapped from the
 * checkpoint's image, so the stream carries only the block list, the small blocks and the device
 * state. Eager: every non-zero page of every block goes through the stream (a fresh destination's
 * anonymous RAM is zero already; small blocks get explicit ZERO records because a fresh
 * destination has its own ROM contents there).
 */
export async function synthesizeStream(
  ckpt: StoredCheckpoint,
  mode: 'lazy' | 'eager',
  out: (chunk: Buffer) => Promise<void>,
  /** `ckpt` and the checkpoints its RAM builds on, newest first (store/chain.ts `ramChain`). */
  chain: readonly StoredCheckpoint[] = [ckpt],
): Promise<SynthesisStats> {
  const m = ckpt.manifest;
  const stats: SynthesisStats = { pagesSent: 0, zeroPagesSent: 0, bytesWritten: 0 };
  const writer = new MigrationStreamWriter(async (chunk: Buffer) => {
    stats.bytesWritten += chunk.length;
    await out(chunk);
  });
  const pageSize = m.pageSize;
  const zero = Buffer.alloc(pageSize);
  writer.header(fs.readFileSync(path.join(ckpt.dir, CONFIG_FILE)));
  writer.ramStart(
    m.ramSection,
    m.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })),
    { ignoreShared: false },
  );
  writer.beginRamPart();
  const chunk = Buffer.allocUnsafe(READ_CHUNK_BYTES);
  for (let index = 0; index < m.blocks.length; index++) {
    const block = m.blocks[index];
    if (!block) continue;
    const isGuestRam = block.name === ramBlockOf(m.vm);
    if (isGuestRam && mode === 'lazy') continue;
    // Pages come from the newest checkpoint of the chain that holds them.
    const reader = new ChainBlockReader(chain, index);
    try {
      for (let c = 0; c < reader.chunks; c++) {
        const base = c * READ_CHUNK_BYTES;
        const len = reader.readChunk(c, chunk);
        for (let at = 0; at < len; at += pageSize) {
          const isZero = zero.compare(chunk, at, at + pageSize) === 0;
          if (isZero) {
            if (isGuestRam) continue;
            if (!writer.zeroPage(index, base + at)) await writer.drain();
            stats.zeroPagesSent++;
          } else {
            if (!writer.pageAt(index, base + at, chunk, at)) await writer.drain();
            stats.pagesSent++;
          }
        }
      }
    } finally {
      reader.close();
    }
  }
  writer.endRamSection();
  writer.ramEnd();
  writer.deviceState(fs.readFileSync(path.join(ckpt.dir, m.device.file)));
  await writer.flush();
  return stats;
}
